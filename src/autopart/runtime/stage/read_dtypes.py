"""Which offloaded parameters an op reads only as their autocast cast.

Under autocast, an op on autocast's lower-precision list (a matmul, a linear, a convolution)
casts its fp32 weight to bf16 (or fp16) on the device before it runs.  A copy of that weight
fetched from host memory in fp32 then carries twice the bytes the op uses.  Fetching the
bf16 cast made on the host instead is the same to the bit: the same rounding of the same
values, and the gradient autocast sends back through the cast is the op's low-precision
gradient widened, which is what the fetch sends back too.

The op is asked, not looked up in a list: it is run once under autocast on fake tensors of
the stage's device type (autocast's lists differ between the CPU and CUDA) while a dispatch
mode watches what reaches the kernels.  The weight qualifies only when every kernel that sees
it is a cast to the autocast dtype; an op that reads it in fp32 (a layer norm, an embedding,
an add promoting a bf16 input) keeps fp32 copies, and so does any op the probe cannot run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["read_as_cast"]

log = logging.getLogger(__name__)

#: Stand-in size of a dimension whose captured size is symbolic without a hint.
_ROWS = 2

#: Kernels that read a tensor's metadata, not its values.
_METADATA = frozenset(
    {
        torch.ops.prim.device.default,
        torch.ops.aten.sym_size.int,
        torch.ops.aten.sym_stride.int,
        torch.ops.aten.sym_numel.default,
        torch.ops.aten.sym_storage_offset.default,
        torch.ops.aten.is_contiguous.default,
        torch.ops.aten.dim.default,
    }
)


def read_as_cast(
    module: fx.GraphModule, node: fx.Node, weight: fx.Node, device: torch.device, autocast: Any
) -> bool:
    """Does ``node`` of ``module`` read the tensor attribute ``weight`` only through
    autocast's cast to ``autocast``, on ``device``'s type?"""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        twins: dict[fx.Node, torch.Tensor] = {}

        def stand_in(arg: Any) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            if arg.op == "get_attr":
                val = module.get_parameter(str(arg.target)) if arg is weight else _attr(module, arg)
            else:
                val = arg.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"no example value for {arg.name}")
            twins[arg] = _fake(val.shape, val.dtype, device, mode)
            return twins[arg]

        args, kwargs = pytree.tree_map(stand_in, (node.args, node.kwargs))
        watch = _Watch(twins[weight], autocast)
        with mode, torch.autocast(device.type, dtype=autocast, cache_enabled=False), watch:
            node.target(*args, **kwargs)
    except Exception as err:  # whatever the probe cannot run reads fp32 copies
        log.debug("%s reads %s in fp32: the probe failed (%s)", node.name, weight.name, err)
        return False
    return watch.casts > 0 and not watch.other_reads


def _attr(module: fx.GraphModule, node: fx.Node) -> Any:
    value: Any = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _fake(shape: Any, dtype: torch.dtype, device: torch.device, mode: FakeTensorMode):
    sizes = [s if isinstance(s, int) else (s.node.hint or _ROWS) for s in shape]
    with mode:
        return torch.zeros(sizes, dtype=dtype, device=device)


class _Watch(TorchDispatchMode):
    """Counts the kernels that see ``weight``: casts to ``dtype``, and any other read."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.dtype = weight, dtype
        self.casts, self.other_reads = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = any(a is self.weight for a in pytree.tree_leaves((args, kwargs)))
        if seen and func not in _METADATA:
            cast = func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype
            self.casts += cast
            self.other_reads |= not cast
        return func(*args, **kwargs)
