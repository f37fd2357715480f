"""`Config`: one validated value for every user choice, and the plan as the runtime's record
of them: what a plan was costed with comes back when it is loaded, and a loaded plan that
contradicts an explicit keyword is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autopart.capture import capture
from autopart.config import Config, Offload, check_plan_agrees
from autopart.cost import AnalyticCostModel, get_device_spec
from autopart.errors import AutopartError
from autopart.plan.plan import Plan
from autopart.plan.planner import PlanOptions, make_plan


def _plan(tmp_path, **choices) -> Plan:
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    graph = capture(model, (torch.randn(2, 16),))
    config = Config(**choices)
    options = PlanOptions.from_config(config, devices=2, global_batch=8, optimizer="adam")
    plan = make_plan(graph, AnalyticCostModel(get_device_spec("cpu")), options)
    plan.save(tmp_path / "plan.json")
    return Plan.load(tmp_path / "plan.json")


def test_a_saved_plan_keeps_what_it_was_costed_with(tmp_path):
    plan = _plan(tmp_path, offload="params", prefetch=4, precision="bf16", schedule="gpipe")
    assert plan.precision == "bf16" and plan.schedule == "gpipe"
    assert all(s.offload is Offload.PARAMS and s.prefetch == 4 for s in plan.stages)
    assert '"offload": "params"' in (tmp_path / "plan.json").read_text()
    plain = _plan(tmp_path)
    assert plain.precision == "fp32" and all(s.prefetch == 0 for s in plain.stages)


def test_a_loaded_plan_must_agree_with_explicit_keywords(tmp_path):
    plan = _plan(tmp_path, offload="params", prefetch=4, precision="bf16")
    check_plan_agrees(plan, Config.from_keywords(), "plan.json")  # nothing given: runs as is
    check_plan_agrees(plan, Config.from_keywords(prefetch=4, precision="bfloat16"), "plan.json")
    for given, said in [
        (dict(prefetch=1), "another prefetch"),
        (dict(precision="fp32"), "precision 'bf16'"),
        (dict(offload=False), "other offload"),
        (dict(stages=3), "not stages=3"),
    ]:
        with pytest.raises(AutopartError, match=said):
            check_plan_agrees(plan, Config.from_keywords(**given), "plan.json")


@pytest.mark.parametrize(
    ("choice", "said"),
    [
        (dict(precision="fp8"), "unknown precision"),
        (dict(zero="some"), "unknown zero"),
        (dict(offload="disk"), "unknown offload"),
        (dict(prefetch=-1), "prefetch must be 0 or more"),
        (dict(schedule="zigzag"), "unknown schedule"),
        (dict(stages=0), "stages must be at least 1"),
        (dict(batch_dims={"src": "1"}), "batch_dims must map argument names"),
        (dict(batch_dims=[1]), "batch_dims must map argument names"),
    ],
)
def test_bad_choices_are_refused_once_with_a_clear_error(choice, said):
    with pytest.raises(AutopartError, match=said):
        Config(**choice)


def test_keywords_remember_what_was_given():
    config = Config.from_keywords(stages=2, zero=None, device_memory="1GiB", offload=True)
    assert config.given == {"stages", "device_memory", "offload"}
    assert config.device_memory == 2**30 and config.offload is Offload.PARAMS_OPTIMIZER
    with pytest.raises(AutopartError, match="unknown option"):
        Config.from_keywords(stagez=2)


def test_options_are_declared_once_on_config():
    """`Module`'s keywords are `Config`'s fields (typed for users, so spelled out there; this
    keeps them from drifting), and every field has the one description the CLI repeats."""
    import inspect

    from autopart.config import option_docs
    from autopart.module import Module

    fields_ = {f.name for f in dataclasses.fields(Config)} - {"given"}
    keywords = set(inspect.signature(Module.__init__).parameters) - {
        "self",
        "model",
        "optimizer",
        "config",
    }
    assert keywords == fields_
    assert set(option_docs()) - {"given"} == fields_
