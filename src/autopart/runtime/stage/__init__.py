"""This rank's stage as tensors and modules: the stage module cut out of the captured graph
(`graph_cut`), real tensors for a meta-built model (`materialize`, from `tensor_sources`), and
host-resident parameters (`offload`)."""

from autopart.runtime.stage.graph_cut import StageIO, build_stage_module, stage_ios, state_updates
from autopart.runtime.stage.materialize import InitFn, has_meta, materialize
from autopart.runtime.stage.offload import ParamOffload, StepOnDevice
from autopart.runtime.stage.tensor_sources import CheckpointError, open_checkpoint

__all__ = [
    "CheckpointError",
    "InitFn",
    "ParamOffload",
    "StageIO",
    "StepOnDevice",
    "build_stage_module",
    "has_meta",
    "materialize",
    "open_checkpoint",
    "stage_ios",
    "state_updates",
]
