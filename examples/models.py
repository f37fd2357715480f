"""Model factories for `autopart plan` and the benchmarks.

Each factory returns ``(model, args)`` or ``(model, args, kwargs)`` with example inputs of one
sample.  The large ones build on the ``meta`` device: planning them allocates no memory.
"""

from __future__ import annotations

import torch
from torch import nn

from autopart.cli.models import gpt2


def _gpt2(n_layer: int, n_embd: int, n_head: int, seq: int, vocab: int, device: str = "cpu"):
    return gpt2(n_layer=n_layer, n_embd=n_embd, n_head=n_head, seq=seq, vocab=vocab, device=device)


def gpt2_tiny():
    """A 4-layer GPT-2 small enough to train on a laptop CPU."""
    torch.manual_seed(0)
    return _gpt2(n_layer=4, n_embd=64, n_head=4, seq=32, vocab=256)


def gpt2_small():
    """GPT-2 small (124M), on meta."""
    return _gpt2(n_layer=12, n_embd=768, n_head=12, seq=1024, vocab=50257, device="meta")


def gpt3_175b():
    """GPT-3 175B: 96 layers, d=12288, 96 heads, sequence 2048, on meta."""
    return _gpt2(n_layer=96, n_embd=12288, n_head=96, seq=2048, vocab=50257, device="meta")


def gpt_sized(n_layer: int, n_embd: int):
    """A GPT-3-family shape on meta, for planning-time sweeps."""
    return _gpt2(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(1, n_embd // 128),
        seq=2048,
        vocab=50257,
        device="meta",
    )


class DeepMLP(nn.Module):
    """RaNNC's tutorial MLP: ``layers`` Linear+ReLU of width ``hidden``."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(layers)]
        )

    def forward(self, x):
        return self.layers(x)


def mlp_2_5b():
    """The 2.5B-parameter MLP of RaNNC's tutorial (hidden 5000, 100 layers), on meta."""
    with torch.device("meta"):
        model = DeepMLP(hidden=5000, layers=100)
        x = torch.zeros(1, 5000)
    return model, (x,)


class Unbalanced(nn.Module):
    """Layers of very different widths: an even split by layer count is a poor plan here."""

    def __init__(self) -> None:
        super().__init__()
        widths = [256, 256, 2048, 2048, 256, 256, 4096, 256, 256, 256, 1024, 256]
        self.layers = nn.ModuleList(
            nn.Linear(256, w) if i % 2 == 0 else nn.Linear(widths[i - 1], 256)
            for i, w in enumerate(widths)
        )
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def unbalanced():
    torch.manual_seed(0)
    return Unbalanced(), (torch.randn(1, 256),)
