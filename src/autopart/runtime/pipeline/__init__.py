"""One call, from arguments to outputs and back: this rank's stage built for a call
signature (`builder`, `signatures`), its schedule run (`runner`, with `step_state`,
`whole_outputs` and 1F1B's `loss_grads`), the boundary with the caller (`bridge`), and the
call itself with its backward and gradient sums (`calls`)."""

from autopart.runtime.pipeline.builder import StageBuilder, canonical_names
from autopart.runtime.pipeline.calls import Calls
from autopart.runtime.pipeline.runner import StageRunner
from autopart.runtime.pipeline.signatures import call_key

__all__ = ["Calls", "StageBuilder", "StageRunner", "call_key", "canonical_names"]
