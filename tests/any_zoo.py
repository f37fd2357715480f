"""Models that break autopart's easy assumptions, as users write them: a branch on tensor
values (DeBERTa-v2's default classification loss), and batches that are not dimension 0
(PyTorch's sequence-first recurrent and Transformer layers).  Entries are registered in
`hf_zoo.HF_ZOO` with the same ``(build, make_batch)`` contract."""

from __future__ import annotations

import torch
from torch import nn

SEQ = 8
VOCAB = 64
LABELS = 3


def deberta_classifier(dropout: float = 0.0):
    """`DebertaV2ForSequenceClassification` at its default configuration: no ``problem_type``,
    so integer labels go through ``if label_index.size(0) > 0:``."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=LABELS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return DebertaV2ForSequenceClassification(config)


def _classified(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels = torch.randint(0, LABELS, (rows,), generator=gen)
    return (), {"input_ids": ids, "labels": labels}


ANY_ZOO = {
    "deberta_cls": (deberta_classifier, _classified),
}


class SequenceFirstGRU(nn.Module):
    """A word-level language model as PyTorch's example writes it: ``(seq, batch)`` token ids
    and a ``(layers, batch, hidden)`` state in, ``(seq, batch, vocab)`` scores out."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, 16, num_layers=2, dropout=dropout)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, src, hidden, targets=None):
        out, hidden = self.rnn(self.embed(src), hidden)
        logits = self.head(out)
        if targets is None:
            return logits, hidden
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        return loss, hidden


class ExampleRNNModel(SequenceFirstGRU):
    """PyTorch's word-language-model example: the scores come back flattened, ``(seq *
    batch, vocab)``, so the rows of a batch are interleaved in them; the caller computes the
    loss against ``targets.view(-1)``."""

    def forward(self, src, hidden):
        out, hidden = self.rnn(self.embed(src), hidden)
        decoded = self.head(out).view(-1, VOCAB)
        return nn.functional.log_softmax(decoded, dim=1), hidden


def _seq_first_tokens(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, VOCAB, (SEQ + 1, rows), generator=gen)
    hidden = torch.randn(2, rows, 16, generator=gen)
    return (src[:-1], hidden), {"targets": src[1:]}


class PositionalEncoding(nn.Module):
    def __init__(self, width: int, length: int = 64) -> None:
        super().__init__()
        position = torch.arange(length).unsqueeze(1)
        scale = torch.exp(torch.arange(0, width, 2) * (-9.2 / width))
        table = torch.zeros(length, 1, width)
        table[:, 0, 0::2] = torch.sin(position * scale)
        table[:, 0, 1::2] = torch.cos(position * scale)
        self.register_buffer("pe", table)

    def forward(self, x):
        return x + self.pe[: x.size(0)]


class TutorialTransformer(nn.Module):
    """The word-language-model tutorial's ``TransformerModel``: ``batch_first=False``, and a
    causal mask made in ``forward`` from the sequence length (which nn.TransformerEncoder then
    compares with its own, on values)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.pos = PositionalEncoding(16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, src, targets=None):
        mask = nn.Transformer.generate_square_subsequent_mask(len(src))
        h = self.encoder(self.pos(self.embed(src) * 4.0), mask)
        logits = self.head(h)
        if targets is None:
            return logits
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def _seq_first_plain(rows: int, seed: int):
    (src, _), kwargs = _seq_first_tokens(rows, seed)
    return (src,), kwargs


class SequenceFirstLSTM(nn.Module):
    """An ``nn.LSTM`` encoder (``batch_first=False``) with a per-sequence classifier: the
    final state, ``(layers, batch, hidden)``, carries the batch in dimension 1."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, dropout=dropout)
        self.head = nn.Linear(16, LABELS)

    def forward(self, x, labels=None):
        out, (h, _) = self.lstm(torch.tanh(self.proj(x)))
        logits = self.head(h[-1] + out.mean(0))
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits, labels)


def _seq_first_features(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, rows, 6, generator=gen)
    return (x,), {"labels": torch.randint(0, LABELS, (rows,), generator=gen)}


ANY_ZOO.update(
    {
        "gru_seq_first": (SequenceFirstGRU, _seq_first_tokens),
        "rnn_example": (ExampleRNNModel, lambda rows, seed: (_seq_first_tokens(rows, seed)[0], {})),
        "tutorial_transformer": (TutorialTransformer, _seq_first_plain),
        "lstm_seq_first": (SequenceFirstLSTM, _seq_first_features),
    }
)

#: The same models with dropout on, for the evaluation checks.
ANY_DROPOUT_ZOO = {
    name: (lambda build=build: build(0.1), make_batch)
    for name, (build, make_batch) in ANY_ZOO.items()
    if name != "rnn_example"
}
