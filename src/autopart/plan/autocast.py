"""What autocast changes in a stage's saved tensors: narrower activations, and weight copies.

Capture runs on meta tensors, where autocast does not apply, so the saved bytes it records are
at the parameters' dtype.  Under ``precision="bf16"`` / ``"fp16"`` the runtime runs every stage
under native autocast with fp32 master weights (`autopart.runtime.pipeline.runner`), which changes
two things the memory model must charge:

* **Narrower activations.**  Matmul-like ops (`LOW`) run in the low dtype, so their outputs and
  the inputs they save are half as wide; ops that autocast keeps in float32 (`FULL`: norms,
  softmax, losses) produce float32; every other op follows its floating inputs (one float32
  input makes the result float32, as type promotion does).  A node's saved bytes are scaled
  by the width of the dtype it runs in, a per-node estimate from this propagation over the IR.
* **Low-precision weight copies.**  Autocast casts each weight a matmul-like op reads, and
  autograd saves the copy for backward, so every microbatch in flight holds one copy of its
  stage's matmul weights in the low dtype (the cast cache lives only inside one autocast
  region, and the runtime opens one per microbatch).  They are charged with the microbatch's
  fixed saved bytes.

The fp32 master weights, their gradients and the optimizer state are the parameters' own and
are charged as they are without autocast.  An offloaded weight that only matmul-like ops read
crosses the host link as its low-precision cast, and its gradient comes back at that width
(`autopart.runtime.stage.read_dtypes`); `cast_weights` names them.
"""

from __future__ import annotations

from autopart.ir import Graph, NodeKind, dtype_bytes

#: Ops autocast runs in the low dtype (their float inputs are cast down).
LOW = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "matmul",
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "scaled_dot_product_attention",
        "prelu",
        "einsum",
    }
)

#: Ops autocast runs in float32 whatever their inputs.
FULL = frozenset(
    {
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "cross_entropy_loss",
        "nll_loss",
        "nll_loss_forward",
        "mse_loss",
        "binary_cross_entropy_with_logits",
        "smooth_l1_loss",
        "kl_div",
    }
)


def _aten_name(op: str) -> str:
    """``aten.addmm.default`` -> ``addmm``."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op


def autocast_saved(graph: Graph, dtype: str) -> dict[str, tuple[float, float]]:
    """Per node: its (per-sample, fixed) saved bytes when its stage runs under autocast at
    ``dtype`` (e.g. ``"torch.bfloat16"``), the weight copies included in the fixed part; nodes
    that do not carry the batch keep their captured numbers."""
    low = dtype_bytes(dtype)
    narrow: dict[str, bool] = {}  # value name -> holds the low dtype under autocast
    result: dict[str, tuple[float, float]] = {}
    for node in graph.nodes:
        name = _aten_name(node.op)
        floats = [i for i in node.inputs if i in narrow]
        if name in LOW:
            is_low = True
        elif name in FULL:
            is_low = False
        elif name == "to" or name.startswith("_to_copy"):
            is_low = any(t.dtype == dtype for t in node.outputs)
        else:
            weights = [p for p in node.params if "float" in graph.params[p].dtype]
            is_low = bool(floats) and all(narrow[i] for i in floats) and not weights
        if any("float" in t.dtype for t in node.outputs):
            narrow[node.name] = is_low
        stats = node.stats
        if node.kind is not NodeKind.BATCH:
            # Parameter-only nodes: charged as captured (their dtype is the parameters').
            result[node.name] = (stats.saved_per_sample, stats.saved_fixed)
            continue
        widths = [dtype_bytes(t.dtype) for t in node.outputs if "float" in t.dtype]
        full = max(widths, default=4)
        scale = low / full if is_low else 1.0
        copies = 0.0
        if name in LOW:
            for p in node.params:
                spec = graph.params[p]
                if "float" in spec.dtype and len(spec.shape) >= 2:
                    copies += spec.nbytes * low / dtype_bytes(spec.dtype)
        result[node.name] = (
            stats.saved_per_sample * scale,
            stats.saved_fixed * scale + copies,
        )
    return result


def cast_weights(graph: Graph) -> frozenset[str]:
    """The floating parameters that only matmul-like ops (`LOW`) read: under autocast they
    are read only as their low-precision casts."""
    readers: dict[str, list[str]] = {}
    for node in graph.nodes:
        for p in node.params:
            readers.setdefault(p, []).append(_aten_name(node.op))
    return frozenset(
        p
        for p, ops in readers.items()
        if "float" in graph.params[p].dtype and all(op in LOW for op in ops)
    )
