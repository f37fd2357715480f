"""Real models at their default configuration (cache on), and the batches users feed them.

Each entry is ``(build, make_batch)``: ``build()`` returns a freshly initialized model, and
``make_batch(rows, seed)`` returns ``(args, kwargs)`` for a local batch of ``rows``.  Labels are
padded with -100 by a different amount in every row, so a token mean differs from a row mean;
attention masks mark the same padding.  Dropout is 0 so that outputs can be compared exactly;
`DROPOUT_ZOO` keeps it on for the evaluation checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SEQ = 8
VOCAB = 64


def _padded(rows: int, seed: int, *, labels: bool = True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    target = ids.clone()
    for r in range(rows):
        pad = (seed + 3 * r) % (SEQ - 2)
        if pad:
            mask[r, -pad:] = 0
            target[r, -pad:] = -100
    kwargs = {"attention_mask": mask}
    if labels:
        kwargs["labels"] = target
    return (ids,), kwargs


def _masked_lm(rows: int, seed: int):
    args, kwargs = _padded(rows, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    chosen = torch.rand(rows, SEQ, generator=gen) < 0.4
    kwargs["labels"] = torch.where(chosen, args[0], torch.full_like(args[0], -100))
    return args, kwargs


def gpt2(dropout: float = 0.0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers,
        n_embd=32,
        n_head=4,
        n_positions=SEQ,
        vocab_size=VOCAB,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config)


def llama(dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        attention_dropout=dropout,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def bert_mlm(dropout: float = 0.0):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForMaskedLM(config)


class LossForms(nn.Module):
    """A small network whose loss takes one of the forms users write by hand."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.embed = nn.Embedding(VOCAB, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.head = nn.Linear(16, VOCAB)
        self.register_buffer("class_weight", torch.linspace(0.5, 1.5, VOCAB))
        self.register_buffer("alpha", torch.tensor(0.3))
        self.log_sigma = nn.Parameter(torch.tensor(0.2))

    def forward(self, ids, labels, num_items=None):
        logits = self.head(self.body(self.embed(ids)))
        flat, target = logits.view(-1, VOCAB), labels.view(-1)
        if self.form == "token_mean":
            return F.cross_entropy(flat, target, ignore_index=-100)
        if self.form == "weighted":
            return F.cross_entropy(flat, target, weight=self.class_weight, ignore_index=-100)
        if self.form == "smoothed":
            return F.cross_entropy(flat, target, ignore_index=-100, label_smoothing=0.1)
        if self.form == "nll":
            return F.nll_loss(F.log_softmax(flat, -1), target, ignore_index=-100)
        if self.form == "sum_over_items":
            return F.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / num_items
        if self.form == "masked_ratio":
            valid = (labels != -100).float()
            per = F.cross_entropy(flat, target.clamp(min=0), reduction="none").view_as(valid)
            return (per * valid).sum() / valid.sum()
        if self.form == "mixed":
            token = F.cross_entropy(flat, target, ignore_index=-100)
            return token + 0.1 * logits.pow(2).mean() - logits.mean() / 4
        if self.form == "row_sum":
            return logits.pow(2).sum() * 0.01
        token = F.cross_entropy(flat, target, ignore_index=-100)
        if self.form == "param_decay":  # weight decay written inside forward
            return token + 0.01 * self.head.weight.pow(2).sum()
        if self.form == "buffer_weight":
            return self.alpha * token
        if self.form == "learned_weight":  # uncertainty weighting: a parameter scales the loss
            sigma = self.log_sigma.exp()
            return token / (2 * sigma**2) + torch.log(sigma)
        if self.form == "batchmean":
            return F.kl_div(
                F.log_softmax(logits[:, 0], -1), F.softmax(logits[:, 1], -1), reduction="batchmean"
            )
        if self.form == "over_rows":
            return F.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / ids.shape[0]
        raise ValueError(self.form)


LOSS_FORMS = (
    "token_mean",
    "weighted",
    "smoothed",
    "nll",
    "sum_over_items",
    "masked_ratio",
    "mixed",
    "row_sum",
    "param_decay",
    "buffer_weight",
    "learned_weight",
    "batchmean",
    "over_rows",
)


def _loss_batch(rows: int, seed: int):
    (ids,), kwargs = _padded(rows, seed)
    return (ids, kwargs["labels"]), {"num_items": torch.tensor(7.0)}


class SqueezedRegression(nn.Module):
    """Hugging Face's regression loss pattern: ``mse_loss(logits.squeeze(), labels.squeeze())``,
    which at one row per chunk must not squeeze the batch away."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        return F.mse_loss(self.body(x).squeeze(), y.squeeze())


def _regression_batch(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 6, generator=gen), torch.randn(rows, generator=gen)), {}


def _padded_with_extras(rows: int, seed: int):
    """Keywords that reach a Hugging Face forward only through ``**kwargs``."""
    args, kwargs = _padded(rows, seed)
    kwargs["num_items_in_batch"] = (kwargs["labels"] != -100).sum() + 5
    kwargs["output_hidden_states"] = True
    return args, kwargs


HF_ZOO = {
    "gpt2_extras": (gpt2, _padded_with_extras),
    "squeezed_regression": (SqueezedRegression, _regression_batch),
    "gpt2": (gpt2, _padded),
    "gpt2_deep": (lambda: gpt2(layers=4), _padded),
    "llama": (llama, _padded),
    "bert_mlm": (bert_mlm, _masked_lm),
    **{f"loss_{form}": (lambda form=form: LossForms(form), _loss_batch) for form in LOSS_FORMS},
}


class ModeDependent(nn.Module):
    """Layers whose behaviour export fixes in training mode: dropout inside an LSTM and a
    Transformer layer, functional dropout, and a Python branch on ``self.training``."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, dropout=dropout, batch_first=True)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids, attention_mask=None, labels=None):
        h, _ = self.lstm(self.embed(ids))
        h = self.block(h)
        if self.training:
            h = F.dropout(h, 0.2) * 1.5
        logits = self.head(h)
        if labels is None:
            return logits
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)


DROPOUT_ZOO = {
    "gpt2": (lambda: gpt2(0.1), _padded),
    "llama": (lambda: llama(0.1), _padded),
    "bert_mlm": (lambda: bert_mlm(0.1), _masked_lm),
    "mode_dependent": (ModeDependent, _padded),
}


def t5(dropout: float = 0.0):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=dropout,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


HF_ZOO["t5"] = (t5, _padded)

from any_zoo import ANY_DROPOUT_ZOO, ANY_ZOO  # noqa: E402  (registered after the entries above)

HF_ZOO.update(ANY_ZOO)
DROPOUT_ZOO.update(ANY_DROPOUT_ZOO)
