"""Small models covering the graph shapes the planner must handle.

Each factory returns ``(model, args, kwargs)`` with seeded float32 weights and example inputs of
batch 1.  Dropout is zero everywhere so a captured graph can be compared with eager output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopart.cli.models import gpt2

Example = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]

SEQ = 16
VOCAB = 128


def mlp(width: int = 32, depth: int = 3, seed: int = 0) -> Example:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dims = [16] + [width] * (depth - 1) + [8]
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers), (torch.randn(1, 16),), {}


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class _ResNetCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = _Residual(8)
        self.pool = nn.MaxPool2d(2)
        self.block2 = _Residual(8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.block1(self.stem(x)))
        h = F.adaptive_avg_pool2d(self.block2(h), 4)
        return self.head(h.view(h.size(0), -1))


def resnet_cnn() -> Example:
    torch.manual_seed(0)
    return _ResNetCNN(), (torch.randn(1, 3, 16, 16),), {}


def gpt2_tiny(n_layer: int = 2) -> Example:
    model, args = gpt2(n_layer=n_layer, n_embd=32, n_head=4, seq=SEQ, vocab=VOCAB, dropout=0.0)
    return model, args, {}


def bert_tiny() -> Example:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    mask = torch.ones(1, SEQ, dtype=torch.long)
    mask[:, -3:] = 0
    return BertModel(config), (torch.randint(0, VOCAB, (1, SEQ)),), {"attention_mask": mask}


class _MaskedStack(nn.Module):
    """Every layer reads the mask, so it must reach every pipeline stage."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) * mask.unsqueeze(-1)
        return x


def kwargs_mask() -> Example:
    torch.manual_seed(0)
    mask = torch.ones(1, 8)
    mask[:, -2:] = 0
    return _MaskedStack(), (torch.randn(1, 8, 16),), {"mask": mask}


class _Tied(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.emb(tokens))))


def tied() -> Example:
    torch.manual_seed(0)
    return _Tied(), (torch.randint(0, 64, (1, 8)),), {}


class _Skip(nn.Module):
    """The first layer's output is read again by the last: a long-lived activation."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.middle = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.last = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = torch.relu(self.first(x))
        h = early
        for layer in self.middle:
            h = torch.relu(layer(h))
        return self.last(h + early)


def skip() -> Example:
    torch.manual_seed(0)
    return _Skip(), (torch.randn(1, 16),), {}


class _LossInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), target)


def loss_inside() -> Example:
    torch.manual_seed(0)
    return _LossInside(), (torch.randn(1, 16), torch.randint(0, 5, (1,))), {}


class _RNNLoop(nn.Module):
    """One cell's weights reused at every step of a fixed-length unrolled loop."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.cell = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(x[:, 0])
        for t in range(x.size(1)):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], dim=-1)))
        return self.head(h)


def rnn_loop() -> Example:
    torch.manual_seed(0)
    return _RNNLoop(), (torch.randn(1, 6, 16),), {}


class _ParamDerived(nn.Module):
    """A gate computed from a parameter alone and read by every layer."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.gate_logits = nn.Parameter(torch.randn(width))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate_logits) * 2.0
        for layer in self.layers:
            x = torch.relu(layer(x)) * gate
        return x


def param_derived() -> Example:
    torch.manual_seed(0)
    return _ParamDerived(), (torch.randn(1, 16),), {}


class _FanOut(nn.Module):
    """One activation read by three branches at once, concatenated back."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(3 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.cat([torch.tanh(b(h)) for b in self.branches], dim=-1))


def fan_out() -> Example:
    torch.manual_seed(0)
    return _FanOut(), (torch.randn(1, 16),), {}


class _ForkJoin(nn.Module):
    """A deep branch and a shallow branch from the same fork, joined by an add."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fork = nn.Linear(width, width)
        self.deep = nn.Sequential(
            nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.shallow = nn.Linear(width, width)
        self.join = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fork(x))
        return self.join(self.deep(h) + self.shallow(h))


def fork_join() -> Example:
    torch.manual_seed(0)
    return _ForkJoin(), (torch.randn(1, 16),), {}


ZOO: dict[str, Callable[[], Example]] = {
    "fan_out": fan_out,
    "fork_join": fork_join,
    "mlp": mlp,
    "resnet_cnn": resnet_cnn,
    "gpt2_tiny": gpt2_tiny,
    "bert_tiny": bert_tiny,
    "kwargs_mask": kwargs_mask,
    "tied": tied,
    "skip": skip,
    "loss_inside": loss_inside,
    "rnn_loop": rnn_loop,
    "param_derived": param_derived,
}
