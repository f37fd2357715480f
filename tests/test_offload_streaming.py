"""How an offloaded stage streams: gradients go back once per backward, not per op, and
copies are made ahead of use by bytes, not by count."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from autopart.runtime.stage.offload import ParamOffload


class _Net(nn.Module):
    """Eight small parameters, then a large one, then a weight read by two ops (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.ParameterList([nn.Parameter(torch.randn(16)) for _ in range(8)])
        self.big = nn.Parameter(torch.randn(16, 256))
        self.tied = nn.Parameter(torch.randn(256, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.small:
            x = torch.tanh(x * p)
        h = x @ self.big
        return (h @ self.tied) * (h @ self.tied).sigmoid()


def _stage(depth: int = 1) -> tuple[fx.GraphModule, ParamOffload, nn.Module]:
    torch.manual_seed(0)
    plain = _Net()
    module = fx.symbolic_trace(copy.deepcopy(plain))
    return module, ParamOffload(module, torch.device("cpu"), depth), plain


def _step(module: fx.GraphModule, offload: ParamOffload, x: torch.Tensor) -> None:
    with offload.forward():
        out = module(x)
    with offload.backward():
        out.pow(2).sum().backward()


def test_gradients_reach_the_host_parameters_once_when_the_backward_ends():
    module, offload, plain = _stage()
    fired: dict[str, list] = {}
    for name, param in offload.host.items():
        seen = fired.setdefault(name, [])
        param.register_post_accumulate_grad_hook(
            lambda p, seen=seen: seen.append(None if p.grad is None else p.grad.clone())
        )
    x = torch.randn(4, 16)
    with offload.forward():
        out = module(x)
    with offload.backward():
        out.pow(2).sum().backward()
        # Nothing lands while the stage's backward runs: it is drained at its end.
        assert all(not seen for seen in fired.values()), fired
        assert all(p.grad is None for p in offload.parameters())
    plain(x).pow(2).sum().backward()
    want = dict(plain.named_parameters())
    for name, param in offload.host.items():
        # Exactly one accumulation per parameter, with its gradient in it (the tied weight's
        # two reads summed first, as autograd sums them): a hook that fired with nothing in
        # it would start a replica's all-reduce of zeros.
        assert len(fired[name]) == 1 and fired[name][0] is not None, (name, fired[name])
        torch.testing.assert_close(param.grad, want[name].grad, rtol=0, atol=0)
        torch.testing.assert_close(fired[name][0], param.grad, rtol=0, atol=0)


def test_gradients_accumulate_over_backwards_as_autograd_accumulates_them():
    module, offload, plain = _stage()
    xs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for x in xs:
        _step(module, offload, x)
        plain(x).pow(2).sum().backward()
    want = dict(plain.named_parameters())
    for name, param in offload.host.items():
        torch.testing.assert_close(param.grad, want[name].grad, rtol=0, atol=0)


def test_a_failed_backward_leaves_no_gradient_queued():
    module, offload, _ = _stage()
    with offload.forward():
        out = module(torch.randn(4, 16))
    try:
        with offload.backward():
            out.pow(2).sum().backward()
            raise RuntimeError("a peer died")
    except RuntimeError:
        pass
    assert all(p.grad is None for p in offload.parameters())
    _step(module, offload, torch.randn(4, 16))  # the next step starts clean
    assert all(p.grad is not None for p in offload.parameters())


def _traced(offload: ParamOffload) -> tuple[list[str], list[int]]:
    """Record the slots copied, in order, and the bytes copied ahead of use after each
    copy is handed to an op (checked against the copies actually in flight)."""
    copied: list[str] = []
    ahead: list[int] = []
    copy_of, take = offload._copy, offload.take

    def copy(key: str):
        copied.append(key)
        return copy_of(key)

    def taken(key: str):
        result = take(key)
        in_flight = sum(offload._slot_bytes(k) for k in offload._inflight)
        assert offload._inflight_bytes == in_flight
        ahead.append(in_flight)
        return result

    offload._copy, offload.take = copy, taken  # type: ignore[method-assign]
    return copied, ahead


def test_copies_run_ahead_by_bytes_small_ones_together():
    module, offload, _ = _stage(depth=1)
    copied, ahead = _traced(offload)
    offload.take = _first_take(offload, copied)  # type: ignore[method-assign]
    _step(module, offload, torch.randn(4, 16))
    assert offload.budget == 256 * 16 * 4  # one of the largest parameter
    # A depth of one parameter, counted in bytes, moves all eight small ones (and nothing
    # else: the large one does not fit beside them) before the first is used.
    assert offload.first == [f"small.{i}" for i in range(8)], offload.first
    assert 0 < max(ahead) <= offload.budget


def _first_take(offload: ParamOffload, copied: list[str]):
    take = offload.take

    def first(key: str):
        if not hasattr(offload, "first"):
            offload.first = list(copied)  # type: ignore[attr-defined]
        return take(key)

    return first


def test_no_copy_runs_ahead_at_depth_zero():
    module, offload, _ = _stage(depth=0)
    copied, ahead = _traced(offload)
    _step(module, offload, torch.randn(4, 16))
    assert copied and max(ahead) == 0
