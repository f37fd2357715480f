"""What a plan and a run look like to a person: the plan table (`plan_table`), Chrome
traces of the predicted and measured timelines (`trace`), predicted against measured per
stage (`fidelity`), and live tensor bytes on any device (`memtrack`)."""
