"""Move one graph value between ranks: slicing rows out, sending, receiving, and reassembling.

A value is a tensor, a scalar, or a tuple/list of them (``split`` returns a list).  Each leaf
moves by its kind:

* a tensor with a batch dimension moves by rows (`layout.transfers`);
* any other tensor, and a scalar that does not depend on the batch, is copied whole from one
  holder to each needer;
* a scalar that is shape arithmetic on the batch is not sent at all: each needer rebuilds it
  from its own row count (`TensorSpec.affine`).

Sends are asynchronous and collected in ``pending``; receives block.  Messages between two
ranks are matched by the order they are posted in, as NCCL matches them; tags are 0 unless
`autopart.runtime.transport.messages` is asked to add them for debugging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopart.errors import AutopartError
from autopart.ir import Graph, TensorSpec
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.layout import Rows, Transfer, transfers


class RuntimeCommError(AutopartError):
    """A peer rank stopped answering: it died, raised, or is running a different step."""


@dataclass(frozen=True)
class ValueShape:
    """How to rebuild a value from its leaves."""

    leaves: tuple[TensorSpec, ...]
    container: type | None  # None: a single leaf

    def pack(self, leaves: list):
        return leaves[0] if self.container is None else self.container(leaves)

    def unpack(self, value) -> list:
        return [value] if self.container is None else list(value)


def moves_for(
    spec: TensorSpec, holders: dict[int, Rows], needers: dict[int, Rows]
) -> list[Transfer]:
    """Transfers for one leaf: by rows for batch tensors, whole otherwise."""
    if spec.is_batch:
        return transfers(holders, needers)
    if spec.affine is not None:
        return []
    sources = sorted(holders)
    return [
        Transfer(dst if dst in holders else sources[dst % len(sources)], dst, (0, 0))
        for dst in sorted(needers)
    ]


def value_shape(graph: Graph, name: str) -> ValueShape:
    """The leaves of a value and the container that holds them, from the captured graph."""
    node = graph.node(name)
    containers = {"tuple": tuple, "list": list}
    container = containers.get(node.container) if node.container else None
    if container is None and len(node.outputs) != 1:
        raise RuntimeCommError(
            f"cannot send value {name} between stages: it has {len(node.outputs)} tensor leaves "
            "in an unknown structure; re-plan with a split point away from it"
        )
    return ValueShape(tuple(node.outputs), container)


def take_rows(value, spec: TensorSpec, held: Rows, rows: Rows):
    """Rows ``rows`` (global numbering) of a leaf that holds global rows ``held``."""
    if spec.batch_dim is None:
        return value
    if spec.outer == 1:
        return row_view(value, spec, held, rows)
    return row_view(value, spec, held, rows).flatten(spec.batch_dim, spec.batch_dim + 1)


def row_view(value: torch.Tensor, spec: TensorSpec, held: Rows, rows: Rows) -> torch.Tensor:
    """A view of rows ``rows`` of a batch leaf that holds rows ``held``, for writing into.
    Interleaved rows (`TensorSpec.outer`) come as ``(outer, rows...)`` blocks: see `blocks`."""
    assert spec.batch_dim is not None
    per = spec.shape[spec.batch_dim] // spec.outer
    start, stop = (rows[0] - held[0]) * per, (rows[1] - held[0]) * per
    return blocks(value, spec).narrow(spec.batch_dim + (spec.outer > 1), start, stop - start)


def blocks(value: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A batch leaf with its interleaved rows split out of their outer blocks: dimension
    ``batch_dim`` becomes ``(outer, rows...)`` (unchanged where ``outer`` is 1)."""
    if spec.outer == 1 or spec.batch_dim is None:
        return value
    return value.unflatten(spec.batch_dim, (spec.outer, -1))


def empty_like_spec(spec: TensorSpec, rows: int, device: torch.device) -> torch.Tensor:
    shape = list(spec.shape)
    if spec.batch_dim is not None:
        shape[spec.batch_dim] *= rows
    return torch.empty(shape, dtype=torch_dtype(spec.dtype), device=device)


def to_tensor(leaf, spec: TensorSpec) -> torch.Tensor:
    """A leaf as a tensor: a Python scalar (a shape value, a loss read out) in its dtype."""
    if isinstance(leaf, torch.Tensor):
        return leaf
    return torch.tensor(leaf, dtype=torch_dtype(spec.dtype))


def torch_dtype(name: str) -> torch.dtype:
    base = name.removeprefix("torch.")
    if base in ("symint", "int"):
        return torch.int64
    if base in ("symfloat", "float"):
        return torch.float64
    if base in ("symbool", "bool"):
        return torch.bool
    return getattr(torch, base)


def is_scalar(spec: TensorSpec) -> bool:
    return spec.dtype in ("int", "float", "bool", "symint", "symfloat", "symbool")


def affine_value(spec: TensorSpec, rows: int):
    assert spec.affine is not None
    per_sample, fixed = spec.affine
    value = per_sample * rows + fixed
    return round(value) if spec.dtype == "symint" else value


def tag(phase: int, microbatch: int, value: int, leaf: int) -> int:
    return ((phase * 128 + microbatch) * 65536 + value) * 16 + leaf


def send(tensor: torch.Tensor, dst: int, message: int, pending: list, group=None) -> None:
    pending.append((dist.isend(tensor.contiguous(), dst, group=group, tag=message), tensor))


def recv(buffer: torch.Tensor, src: int, message: int, what: str, group=None) -> torch.Tensor:
    try:
        dist.recv(buffer, src, group=group, tag=message)
    except RuntimeError as err:
        raise RuntimeCommError(
            f"rank {dist.get_rank()} got no {what} from rank {src}: {first_line(err)}. "
            "That rank has probably died or raised; see its own error"
        ) from err
    return buffer


def wait_all(pending: list) -> None:
    try:
        for work, _ in pending:
            work.wait()
    except RuntimeError as err:
        raise RuntimeCommError(
            f"rank {dist.get_rank()} could not deliver a message: {first_line(err)}. "
            "A peer rank has probably died or raised; see its own error"
        ) from err
    finally:
        pending.clear()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def _as_comm_error(what: Callable[[], str], hint: str = "") -> Iterator[None]:
    """torch.distributed's errors (a peer died, a timeout) as one clear `RuntimeCommError`:
    ``what()`` went wrong (asked only then), then torch's first line, then ``hint``."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, AutopartError):
            raise
        raise RuntimeCommError(f"{what()}: {first_line(err)}{hint}") from err


def comm_errors(rank: int, phase: str) -> contextlib.AbstractContextManager[None]:
    """Around one phase of a call on ``rank``: its communication failures as one message."""
    return _as_comm_error(lambda: f"rank {rank} failed in {phase}")


def reaching_every_rank() -> contextlib.AbstractContextManager[None]:
    """Around a collective of every rank: its failure (a peer died or raised) as one clear
    `RuntimeCommError` that says where to look."""
    return _as_comm_error(
        lambda: f"rank {dist.get_rank()} could not reach every rank",
        ". A rank has probably died or raised; see its own error",
    )


def all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values``, in rank order."""
    return _all_gather(values, torch.int64, device)


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (as float64), in rank order."""
    return _all_gather(values, torch.float64, device)


def _all_gather(values: list, dtype: torch.dtype, device: torch.device) -> list[list]:
    world = dist.get_world_size()
    mine = torch.tensor(values, dtype=dtype, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    with reaching_every_rank():
        dist.all_gather(every, mine, group=job_group())
    return [t.tolist() for t in every]


def join(pieces: list[torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    """One leaf from the row pieces it was received in."""
    if len(pieces) == 1 or spec.batch_dim is None:
        return pieces[0]
    dim = spec.batch_dim
    if spec.outer == 1:
        return torch.cat(pieces, dim=dim)
    joined = torch.cat([blocks(piece, spec) for piece in pieces], dim=dim + 1)
    return joined.flatten(dim, dim + 1)


def from_tensor(value: torch.Tensor, spec: TensorSpec):
    return value.item() if is_scalar(spec) else value
