"""One captured graph per way the model is called, all on the first call's placement.

Capture fixes what a call does beyond its tensors: the argument structure (evaluation without
the ``labels`` training passed), every non-tensor value (``scale=3.0``), the training flag
(``eval()`` must switch dropout inside ``scaled_dot_product_attention``, ``nn.LSTM`` and Python
``if self.training:`` branches, which export bakes in) and whether autograd records.  So each
distinct call signature, mode included, gets a graph of its own, captured when first seen.

Only the first signature is planned.  Each later graph is placed on the same stages: an op
goes to the first stage that holds every trainable parameter it reads (directly or through
parameter-only values) and that is not earlier than the stages of its inputs; an op that reads
no parameter goes with its latest input.  So every rank keeps exactly its parameters, gradient
sums and optimizer, and a signature that would need a parameter where the first call's plan
does not keep it is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
import torch.utils._pytree as pytree

from autopart.config import AUTOCAST_DTYPES, Precision
from autopart.device import caller_autocast
from autopart.errors import AutopartError
from autopart.ir import Graph, NodeKind
from autopart.plan.plan import Plan


@dataclasses.dataclass(frozen=True)
class CallPrecision:
    """What a call's stages compute in: autocast's dtype (None: the parameters' own), and
    whether it is the caller's own ``torch.autocast`` region.

    Inside the caller's region the call runs under it, as the unwrapped model would, and its
    outputs come back in the dtype their op produced (a Linear's bf16 logits).  Otherwise the
    ``precision=`` option applies, and outputs come back in the dtype the model was captured
    with, since the caller did not ask for low-precision values."""

    autocast: torch.dtype | None
    from_caller: bool

    @staticmethod
    def of_call(precision: str, device: torch.device) -> CallPrecision:
        caller = caller_autocast(device)
        if caller is not None:
            return CallPrecision(caller, True)
        return CallPrecision(AUTOCAST_DTYPES[precision], False)

    def name(self) -> Precision:
        """The `Precision` this autocast dtype is."""
        return next(Precision(p) for p, d in AUTOCAST_DTYPES.items() if d == self.autocast)


def call_key(training: bool, args: tuple, kwargs: dict[str, Any], precision: CallPrecision) -> str:
    """What a captured graph depends on besides tensor values: the mode, the argument
    structure, the non-tensor values and the call's precision (a call inside the caller's
    autocast runs other stage code, whose values travel in other dtypes).  Equal on every
    rank for equal calls.

    In eval mode, whether autograd records counts too: layers take fused inference paths
    under ``no_grad`` (``nn.TransformerEncoderLayer``) that a call with gradients must not
    reuse.  In training mode they do not, and a first call under ``no_grad`` (a warm-up) then
    serves training as well."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    plain = [None if isinstance(v, torch.Tensor) else repr(v) for v in leaves]
    recording = None if training else torch.is_grad_enabled()
    text = repr((training, recording, str(spec), plain, precision))
    return hashlib.sha256(text.encode()).hexdigest()


def key_number(key: str) -> int:
    """A call key as an int64, for checking with one collective that all ranks agree."""
    return int(key[:15], 16)


def derive_plan(plan: Plan, graph: Graph) -> Plan:
    """``plan``'s stages, ranks and microbatches, with ``graph``'s ops placed on them."""
    holders: dict[str, set[int]] = {}
    for stage in plan.stages:
        for name in stage.params:
            holders.setdefault(name, set()).add(stage.index)
    trainable = {name for name, spec in graph.params.items() if spec.requires_grad}
    closure = graph.param_only_closure()
    stage_of: dict[str, int] = {}
    members: list[set[str]] = [set() for _ in plan.stages]
    for node in graph.nodes:
        if node.kind is not NodeKind.BATCH:
            continue
        earliest = max((stage_of[i] for i in node.inputs if i in stage_of), default=0)
        ancestors = set().union(*(closure.get(i, frozenset()) for i in node.inputs))
        reads = set(node.params).union(*(graph.node(a).params for a in ancestors))
        needed = reads & trainable
        choices = [
            s
            for s in range(earliest, plan.num_stages)
            if all(s in holders.get(p, ()) for p in needed)
        ]
        if not choices:
            raise AutopartError(
                f"this call computes op {node.name} (in '{node.module_path or 'the model'}'), "
                f"which needs parameter(s) {', '.join(sorted(needed))} after stage {earliest}, "
                "where the first call's plan does not keep them; call the model first with "
                "the arguments this call uses, or pass split_points= so both calls fit"
            )
        stage_of[node.name] = choices[0]
        members[choices[0]].add(node.name)
        members[choices[0]].update(ancestors)
    stages = []
    for stage, names in zip(plan.stages, members, strict=True):
        nodes = [n.name for n in graph.nodes if n.name in names]
        params = dict.fromkeys(p for n in nodes for p in graph.node(n).params)
        paths = dict.fromkeys(graph.node(n).module_path for n in nodes)
        stages.append(
            dataclasses.replace(
                stage, nodes=nodes, params=list(params), module_paths=[p for p in paths if p]
            )
        )
    return dataclasses.replace(plan, fingerprint=graph.fingerprint, stages=stages)
