"""The models `gpu_check.py` trains, built from a fixed seed, with the batches users feed them.

Tiny Hugging Face models at their default configuration but for size (GPT-2, Llama, BERT, T5,
a Mixtral-style mixture of experts) and a ResNet-style CNN written with ``torch.nn`` (there is
no torchvision on the GPU machine) whose loss is computed outside the model, as image
classifiers' usually is.  Token batches are padded the way real ones are: an attention mask,
and labels set to -100 over the padding, by a different amount in every row.

``dropout=None`` keeps each config's default dropout; the exactness checks pass 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
SEQ = 8
ROWS = 4
CLASSES = 10


@dataclass(frozen=True)
class Batch:
    """One step's inputs: the training call's arguments (with labels, for a model that
    computes its own loss), the evaluation call's, and the target of an outside loss."""

    args: tuple
    kwargs: dict[str, Any]
    eval_args: tuple
    eval_kwargs: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(value):
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return replace(
            self,
            args=tuple(map(move, self.args)),
            kwargs={k: move(v) for k, v in self.kwargs.items()},
            eval_args=tuple(map(move, self.eval_args)),
            eval_kwargs={k: move(v) for k, v in self.eval_kwargs.items()},
            target=move(self.target),
        )


@dataclass(frozen=True)
class Family:
    """How to build one kind of model (``build(dropout)``) and a batch for it (``batch(seed)``)."""

    build: Callable[[float | None], nn.Module]
    batch: Callable[[int], Batch]


def seeded(build: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``build(*args, **kwargs)`` from the same seed: a model and its reference start equal."""
    torch.manual_seed(0)
    return build(*args, **kwargs)


def loss_of(output: Any, batch: Batch) -> torch.Tensor:
    """The model's own loss (Hugging Face, given labels), or cross entropy computed outside,
    with the target moved to the output's device, as with DDP: outputs come back on the
    rank's device wherever the model and the batch were."""
    if batch.target is not None:
        return F.cross_entropy(output, batch.target.to(output.device))
    return output.loss


def logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def tensors_in(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output: a tensor, a ``ModelOutput`` (a dict), or a tuple."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in tensors_in(value)]
    return []


def padded(seed: int, rows: int = ROWS, seq: int = SEQ, vocab: int = VOCAB) -> Batch:
    """Token ids with a mask and causal-LM labels, each row padded by its own amount."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.ones(rows, seq, dtype=torch.long)
    labels = ids.clone()
    for row in range(rows):
        pad = (seed + 3 * row) % (seq - 2)
        if pad:
            mask[row, -pad:] = 0
            labels[row, -pad:] = -100
    train = {"attention_mask": mask, "labels": labels}
    return Batch((ids,), train, (ids,), {"attention_mask": mask})


def masked_lm(seed: int) -> Batch:
    """BERT's labels: -100 but at the 40% of positions chosen for prediction."""
    batch = padded(seed)
    ids = batch.args[0]
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.4
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return replace(batch, kwargs={**batch.kwargs, "labels": labels})


def seq2seq(seed: int) -> Batch:
    """T5 evaluates on decoder inputs: the labels shifted right, padding as token 0."""
    batch = padded(seed)
    labels = batch.kwargs["labels"]
    decoder = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1).clamp(min=0)
    return replace(batch, eval_kwargs={**batch.eval_kwargs, "decoder_input_ids": decoder})


def images(seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, 3, 16, 16, generator=gen)
    return Batch((x,), {}, (x,), target=torch.randint(0, CLASSES, (ROWS,), generator=gen))


def _hf(model: str, dropout: float | None, names: tuple[str, ...], **fields: Any) -> nn.Module:
    """``transformers.<model>`` with a config of ``fields``; ``names`` are its dropouts, set
    to ``dropout`` unless it is None."""
    import transformers

    cls = getattr(transformers, model)
    dropouts = {} if dropout is None else dict.fromkeys(names, dropout)
    return cls(cls.config_class(**fields, **dropouts))


def gpt2(
    dropout: float | None = None,
    layers: int = 2,
    hidden: int = 32,
    positions: int = SEQ,
    vocab: int = VOCAB,
) -> nn.Module:
    names = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    sizes = dict(n_layer=layers, n_embd=hidden, n_head=4, n_positions=positions, vocab_size=vocab)
    tokens = dict(bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return _hf("GPT2LMHeadModel", dropout, names, **sizes, **tokens)


#: Llama's and Mixtral's sizes: 2 layers, 32 wide, grouped-query attention.
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    bos_token_id=VOCAB - 1,
    eos_token_id=VOCAB - 1,
    pad_token_id=0,
)


def llama(dropout: float | None = None) -> nn.Module:
    return _hf("LlamaForCausalLM", dropout, ("attention_dropout",), **DECODER)


def mixtral(dropout: float | None = None) -> nn.Module:
    """A mixture of experts: 4 experts, 2 chosen per token."""
    experts = dict(num_local_experts=4, num_experts_per_tok=2)
    return _hf("MixtralForCausalLM", dropout, ("attention_dropout",), **DECODER, **experts)


def bert(dropout: float | None = None) -> nn.Module:
    names = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    tokens = dict(vocab_size=VOCAB, max_position_embeddings=SEQ)
    return _hf("BertForMaskedLM", dropout, names, **sizes, **tokens)


def t5(dropout: float | None = None) -> nn.Module:
    sizes = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    tokens = dict(vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0)
    return _hf("T5ForConditionalGeneration", dropout, ("dropout_rate",), **sizes, **tokens)


class Residual(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with BatchNorm, plus the shortcut (a strided
    1x1 convolution where the block changes width or resolution)."""

    def __init__(self, inside: int, outside: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inside, outside, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outside)
        self.conv2 = nn.Conv2d(outside, outside, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outside)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inside != outside:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inside, outside, 1, stride, bias=False), nn.BatchNorm2d(outside)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = Residual(width, width, 1)
        self.layer2 = Residual(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(self.pool(h), 1))


FAMILIES = {
    "gpt2": Family(gpt2, padded),
    "llama": Family(llama, padded),
    "bert": Family(bert, masked_lm),
    "t5": Family(t5, seq2seq),
    "mixtral": Family(mixtral, padded),
    "cnn": Family(lambda dropout=None: TinyResNet(), images),
}


def linear_stack(layers: int, width: int) -> nn.Sequential:
    """The offload section's model: square Linear + ReLU layers, as wide as asked."""
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks)
