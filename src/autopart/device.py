"""Where tensors live: the one home of autopart's device decisions.

The placement contract (as DDP with ``device_ids`` and FSDP): the user's model may be on the
CPU, on this rank's GPU or on ``meta``, and a call's inputs on the CPU or the GPU, in any mix.
Capture does not depend on any of it: it traces on the model's own device (inputs are moved
there, `capture_device`) and then writes every device the trace baked into its ops
(``arange(device=...)``, ``x.to(device)``, the device type of an autocast region), in the
graph and in the subgraphs of higher-order ops, as the CPU (`canonicalize`).  Whoever runs a
graph points those devices at its own (`retarget`): the stage builder at the rank's device,
the profiler at the device it measures on, the meta runner at ``meta``.  The runtime moves what
each stage needs to the stage's device and hands outputs back on the rank's device
(`local_device`).

Everything CUDA-specific that is not an op lives here too: which device is this rank's,
waiting for queued work, peak memory, the generators random ops draw from, pinned host
memory and side streams for copies.  A CPU device has none of them, and every helper is a
no-op or its plain counterpart there, so the same code runs under gloo on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.utils._pytree as pytree

from autopart.errors import AutopartError

__all__ = [
    "CANONICAL",
    "DEVICE_TYPES",
    "caller_autocast",
    "canonicalize",
    "capture_device",
    "copy_stream",
    "device_name",
    "local_device",
    "map_devices",
    "peak_bytes",
    "pinned",
    "replayed_rng",
    "reset_peak",
    "restore_rng",
    "retarget",
    "rng_state",
    "synchronize",
    "to_device",
    "without_autocast",
]

#: The device every captured graph names in its ops, whatever device it was traced on.
CANONICAL = torch.device("cpu")
#: Device types a string argument of an op may name (``"cuda"``, ``"cpu:0"``).
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "hpu", "meta"})


def local_device() -> torch.device:
    """This rank's device: its GPU under NCCL (``LOCAL_RANK``, made current), else the CPU."""
    if dist.is_initialized() and "nccl" in dist.get_backend():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """What a measurement was taken on: the GPU model, or the CPU architecture and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{platform.machine()}-{torch.get_num_threads()}threads"


def capture_device(model: torch.nn.Module) -> torch.device:
    """The one device the model's parameters and buffers are on (``meta`` if any is there,
    the CPU for a model with none), which is where it can be traced."""
    found = {t.device for t in (*model.parameters(), *model.buffers())}
    if any(d.type == "meta" for d in found):
        return torch.device("meta")
    if len(found) > 1:
        listed = ", ".join(sorted(str(d) for d in found))
        raise AutopartError(
            f"the model's parameters and buffers are on several devices ({listed}); put the "
            "whole model on one device (the CPU, this rank's GPU or meta) before wrapping it: "
            "autopart places every stage itself"
        )
    return found.pop() if found else CANONICAL


def to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` with every tensor leaf on ``device`` (leaves already there are kept)."""
    return pytree.tree_map(
        lambda v: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v, tree
    )


def map_devices(gm: torch.fx.GraphModule, point: Callable[[Any], Any]) -> None:
    """Apply ``point`` to every argument of every op of ``gm`` and of the subgraphs its
    higher-order ops run (``wrap_with_set_grad_enabled``, ``wrap_with_autocast``, ``cond``).

    Subgraphs are replaced by rewritten copies, so a graph module that shares them with
    another (a stage module with the captured one) changes only its own."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(gm)
            if isinstance(value, torch.fx.GraphModule):
                nested = copy.deepcopy(value)
                map_devices(nested, point)
                _set_attr(gm, node.target, nested)
        elif node.op in ("call_function", "call_method"):
            node.args = pytree.tree_map(point, node.args)
            node.kwargs = pytree.tree_map(point, node.kwargs)
    gm.recompile()


def canonicalize(gm: torch.fx.GraphModule, traced_on: torch.device) -> None:
    """Write the device ``gm`` was traced on as `CANONICAL` in all its ops, so that a graph is
    the same whichever device the model was on."""
    if traced_on == CANONICAL:
        return
    map_devices(gm, _pointer({traced_on.type}, CANONICAL))


def retarget(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Point the ops of a canonical graph (and ``meta``, where a meta-built model's trace
    left it) at ``device``, where the plain model would have run them."""
    map_devices(gm, _pointer({CANONICAL.type, "meta"}, device))


def _pointer(types: set[str], device: torch.device) -> Callable[[Any], Any]:
    def point(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type in types:
            return device
        if isinstance(value, str) and value.split(":")[0] in types:
            return device.type if ":" not in value else str(device)
        return value

    return point


def _set_attr(module: torch.nn.Module, target: str, value: Any) -> None:
    path, _, leaf = target.rpartition(".")
    setattr(module.get_submodule(path) if path else module, leaf, value)


# -- what CUDA has and the CPU does not ------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated``; None where the device keeps no such count."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def rng_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The generators a stage's random ops draw from: the CPU's, and the device's own (on
    CUDA dropout draws from the device generator, which the CPU state does not cover)."""
    if device.type == "cpu":
        return (torch.get_rng_state(),)
    return (torch.get_rng_state(), torch.get_device_module(device).get_rng_state(device))


def restore_rng(state: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """Put the generators back as they were when `rng_state` returned ``state`` (a forward
    run again must draw what it drew the first time, and leave them as one run would)."""
    torch.set_rng_state(state[0])
    if device.type != "cpu":
        torch.get_device_module(device).set_rng_state(state[1], device)


def replayed_rng(state: tuple[torch.Tensor, ...], device: torch.device) -> Any:
    """A context in which random ops draw what they drew when `rng_state` returned
    ``state`` (recomputation), leaving the generators as they were afterwards."""
    accelerator = [device] if device.type != "cpu" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=accelerator, device_type=device.type))
    torch.set_rng_state(state[0])
    if accelerator:
        torch.get_device_module(device).set_rng_state(state[1], device)
    return stack


def caller_autocast(device: torch.device) -> torch.dtype | None:
    """The dtype of the ``torch.autocast`` region the caller runs in on ``device``'s type, or
    None outside one.  A DDP user trains in bf16 by calling the model inside autocast; the
    wrapped model must run under it too, not switch it off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def without_autocast(device: torch.device) -> contextlib.ExitStack:
    """A context with the caller's autocast off on ``device``'s type and the CPU: capture
    and profiling see the model as written (the stages apply the call's autocast themselves)."""
    stack = contextlib.ExitStack()
    for kind in dict.fromkeys((device.type, "cpu")):
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy of ``tensor`` to stream to ``device``: page-locked for a GPU, so copies
    run asynchronously at the link's speed; a plain host tensor for the CPU."""
    host = tensor.detach().cpu()
    if device.type == "cuda" and not host.is_pinned():
        return host.pin_memory()
    return host


def copy_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A side stream for host-to-device copies that overlap compute; None on the CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None
