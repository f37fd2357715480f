"""Run a plan on this rank, in four rooms that depend on each other in this order only:

- `stage`: this rank's stage module cut out of the graph, its tensors materialized or read
  from a checkpoint, its parameters offloaded;
- `transport`: who holds which rows, and every message between ranks (point-to-point in
  posting order, the collectives), and joining the process group;
- `data_parallel`: which ranks hold each parameter, the gradient sums over them, ZeRO and
  the optimizer cut down to this rank;
- `pipeline`: one call from arguments to outputs and back, running this rank's schedule.

Beside them, `plan_agreement` (one plan on every rank) and `memory_report` (what a rank holds).
"""
