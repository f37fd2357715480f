"""Models whose batch is not in dimension 0, and models that branch on tensor values, train
like DDP and evaluate like the plain model; the batch dimension of every input is found,
can be given, and is an error naming the input where it cannot be told."""

import pytest
import torch
from torch import nn

from any_zoo import ANY_DROPOUT_ZOO, ANY_ZOO, SequenceFirstGRU, SequenceFirstLSTM
from autopart.capture import capture
from autopart.capture.batch_dims import find_batch_dims
from autopart.errors import CaptureError
from ddp_oracle import OracleCase, eval_each, run_oracles
from multirank import run_ranks


@pytest.mark.multirank
@pytest.mark.slow
def test_sequence_first_and_branching_models_train_like_ddp():
    """A GRU and an LSTM on ``(seq, batch)`` with a ``(layers, batch, hidden)`` state, the
    tutorial's Transformer with its mask made in forward, PyTorch's RNN example whose scores
    come back as ``(seq * batch, vocab)`` rows, and DeBERTa-v2's classifier at its default
    configuration: 1 stage x 2 replicas and 2 stages, 2 microbatches, unequal local batches."""
    cases = [OracleCase(name, stages, 2) for name in ANY_ZOO for stages in (1, 2)]
    run_ranks(2, run_oracles, cases, timeout_s=600)


@pytest.mark.multirank
@pytest.mark.slow
def test_a_rank_with_one_row_finds_the_batch_where_the_others_do():
    """Rank 0's local batch is one row: it cannot run the check on two rows, so it takes the
    dimension of one row left when the sequence is contradicted; every rank must agree."""
    cases = [
        OracleCase("gru_seq_first", 1, 1, base_rows=1),
        OracleCase("gru_seq_first", 2, 2, base_rows=1),
        OracleCase("lstm_seq_first", 2, 2, base_rows=1),
    ]
    run_ranks(2, run_oracles, cases, timeout_s=300)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_sequence_first_and_branching_models_evaluate_like_the_plain_model(stages):
    run_ranks(2, eval_each, sorted(ANY_DROPOUT_ZOO), stages, timeout_s=600)


def _call(name: str, rows: int = 4):
    build, make_batch = ANY_ZOO[name]
    torch.manual_seed(0)
    args, kwargs = make_batch(rows, seed=0)
    return build(), args, kwargs


def test_inputs_with_different_batch_dimensions_are_each_found():
    model, args, kwargs = _call("lstm_seq_first")  # x: (seq, batch, 6); labels: (batch,)
    assert find_batch_dims(model, args, kwargs) == (4, (1, 0))
    model, args, kwargs = _call("gru_seq_first")  # src, hidden and targets: dimension 1
    assert find_batch_dims(model, args, kwargs) == (4, (1, 1, 1))
    graph = capture(model, args, kwargs)
    dims = [graph.node(name).outputs[0].batch_dim for name in graph.inputs]
    assert dims == [1, 1, 1]
    src, hidden = args
    more = (torch.cat([src, src[:, :2]], 1), torch.cat([hidden, hidden[:, :2]], 1))
    targets = torch.cat([kwargs["targets"], kwargs["targets"][:, :2]], 1)
    torch.testing.assert_close(graph.fx_module(*more, targets=targets), model(*more, targets))


def test_a_batch_in_dimension_0_is_still_dimension_0():
    """A batch-first model whose first input has a longer second dimension: the rows are
    independent along dimension 0, so it wins without a warning."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    assert find_batch_dims(model, (torch.randn(4, 6, 8),), {}) == (4, (0,))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + pairs.transpose(0, 1).sum(1)


def test_an_input_with_two_dimensions_of_the_batch_size_is_told_by_running_the_model():
    x = torch.randn(4, 5)
    pairs = torch.randn(6, 4, 4)  # the batch of 4 rows: dimension 1 or 2?
    assert find_batch_dims(_TwoInputs(), (x,), {"pairs": pairs}) == (4, (0, 1))


def test_an_input_whose_batch_dimension_cannot_be_told_is_named():
    """Built on meta, the model cannot be run to tell the dimensions apart."""
    with torch.device("meta"):
        model = _TwoInputs()
    x, pairs = torch.randn(4, 5), torch.randn(6, 4, 4)
    with pytest.raises(CaptureError, match=r"kwargs\['pairs'\].*dimensions \[1, 2\].*batch_dims"):
        capture(model, (x,), {"pairs": pairs})


def test_the_batch_dimension_can_be_given_by_argument_name():
    model, x, pairs = _TwoInputs(), torch.randn(4, 5), torch.randn(6, 4, 4)
    graph = capture(model, (x,), {"pairs": pairs}, batch_dims={"pairs": 1})
    assert [graph.node(n).outputs[0].batch_dim for n in graph.inputs] == [0, 1]
    x3, pairs3 = torch.randn(3, 5), torch.randn(6, 3, 4)
    torch.testing.assert_close(graph.fx_module(x3, pairs=pairs3), model(x3, pairs=pairs3))
    with pytest.raises(CaptureError, match="batch_dims names mask, which the call does not have"):
        capture(model, (x,), {"pairs": pairs}, batch_dims={"mask": 0})
    with pytest.raises(CaptureError, match=r"dimension 3 for kwargs\['pairs'\]"):
        capture(model, (x,), {"pairs": pairs}, batch_dims={"pairs": 3})


def test_a_model_that_reads_its_batch_size_falls_back_to_dimension_0_with_a_warning(caplog):
    class Normalized(nn.Module):
        def forward(self, x):
            return x / x.sum()  # every row depends on every other

    assert find_batch_dims(Normalized(), (torch.rand(4, 3) + 1,), {}) == (4, (0,))
    assert "could not confirm which dimension of args[0]" in caplog.text


def test_the_batch_dimension_of_a_sequence_first_model_is_not_its_sequence():
    """Teeth: on (seq, batch) the sequence is dimension 0 and the check must reject it,
    also where the batch is one row, or the first rows of the sequence are alike (left
    padding)."""
    model = SequenceFirstLSTM()
    x = torch.randn(8, 8, 6)  # seq == batch: only running the model on rows tells them apart
    assert find_batch_dims(model, (x,), {}) == (8, (1,))
    gru = SequenceFirstGRU()
    assert find_batch_dims(gru, (torch.randint(0, 64, (5, 4)), torch.randn(2, 4, 16)), {})[1] == (
        1,
        1,
    )

    assert find_batch_dims(gru, (torch.randint(0, 64, (8, 1)), torch.randn(2, 1, 16)), {}) == (
        1,
        (1, 1),
    )
    assert find_batch_dims(model, (torch.randn(8, 1, 6),), {}) == (1, (1,))
    padded = torch.randint(1, 64, (10, 4))
    padded[:3] = 0  # every sequence starts with the same padding
    assert find_batch_dims(_BagOfTokens(), (padded,), {}) == (4, (1,))


class _BagOfTokens(nn.Module):
    """A sequence-first encoder without positions: identical first timesteps are computed
    alike whether cut as rows or not, so the check must compare rows that differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, src):
        return self.head(self.encoder(self.embed(src)).mean(0))


class _BatchFirstGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(16, 16, num_layers=2, batch_first=True)

    def forward(self, x, hidden):
        return self.rnn(x, hidden)


def test_a_state_whose_layers_match_the_batch_size_is_cut_along_the_batch():
    """``(layers=2, batch=2, hidden)``: dimension 0 has the batch's size too; running the
    model tells them apart."""
    x, hidden = torch.randn(2, 5, 16), torch.randn(2, 2, 16)
    assert find_batch_dims(_BatchFirstGRU(), (x, hidden), {}) == (2, (0, 1))


def test_a_square_mask_of_the_batch_size_has_no_batch():
    """A ``(T, T)`` attention mask where T is also the batch size, sequence-first input."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    src, mask = torch.randn(6, 6, 8), nn.Transformer.generate_square_subsequent_mask(6)
    assert find_batch_dims(layer, (src,), {"src_mask": mask}) == (6, (1, None))
    assert find_batch_dims(layer, (src,), {"src_mask": mask}, {"src": 1}) == (6, (1, None))


def test_an_input_said_to_have_no_batch_is_not_the_anchor():
    class Shared(nn.Module):
        def forward(self, bias, x):
            return bias @ x

    bias, x = torch.randn(5, 5), torch.randn(4, 5, 6)
    assert find_batch_dims(Shared(), (bias, x), {}, {"bias": None}) == (4, (None, 0))


def test_nested_outputs_of_the_fast_path_do_not_stop_the_check():
    """A batch-first encoder with a padding mask returns nested tensors in eval mode."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    x, pad = torch.randn(4, 6, 8), torch.zeros(4, 6, dtype=torch.bool)
    pad[:, 4:] = True
    assert find_batch_dims(encoder, (x,), {"src_key_padding_mask": pad}) == (4, (0, 0))


def test_batch_dims_given_by_name_also_reach_a_later_call_signature():
    """The builder passes the first call's dimensions by source beside the user's names."""
    from autopart.capture.batch_dims import for_call

    gru = SequenceFirstGRU()
    src, hidden = torch.randint(0, 64, (8, 4)), torch.randn(2, 4, 16)
    first = {"args[0]": 1, "args[1]": 1, "kwargs['targets']": 1, "src": 1, "hidden": 1}
    dims = for_call(first, gru, (src, hidden), {})
    graph = capture(gru, (src, hidden), {}, batch_dims=dims, run_model=False)
    assert [graph.node(n).outputs[0].batch_dim for n in graph.inputs] == [1, 1]
    by_name = for_call({"src": 1, "hidden": 1}, gru, (), {"src": src, "hidden": hidden})
    graph = capture(gru, (), {"src": src, "hidden": hidden}, batch_dims=by_name, run_model=False)
    assert [graph.node(n).outputs[0].batch_dim for n in graph.inputs] == [1, 1]


class _FlatDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 64)

    def forward(self, out):
        return self.lin(out).view(-1, 64)


class _FlattenedScores(nn.Module):
    """Sequence-first scores flattened to ``(seq * batch, vocab)`` inside a leaf module, or
    by ``nn.Flatten``: ops the reshape rules do not name."""

    def __init__(self, inside: bool) -> None:
        super().__init__()
        self.embed, self.rnn, self.dec = nn.Embedding(64, 16), nn.GRU(16, 16), _FlatDecoder()
        self.flat, self.inside = nn.Flatten(0, 1), inside

    def forward(self, src):
        out, _ = self.rnn(self.embed(src))
        return self.dec(out) if self.inside else self.flat(self.dec.lin(out))


@pytest.mark.parametrize("inside", [True, False])
def test_rows_interleaved_by_an_opaque_flatten_are_followed(inside):
    src = torch.randint(0, 64, (8, 4))
    leaves = ["dec"] if inside else []
    graph = capture(_FlattenedScores(inside), (src,), method="fx", leaf_modules=leaves)
    out = next(graph.node(leaf.value).outputs[0] for leaf in graph.output_leaves if leaf.value)
    assert (out.batch_dim, out.outer) == (0, 8)


def _train_by_keyword_then_call_by_position(rank: int, world: int) -> None:
    """The first call names its arguments, a later one passes them by position: the later
    capture knows the batch dimensions by argument name (it runs on a view of the model and
    cannot find them), and the local batch is read after it."""
    import copy

    import autopart

    torch.manual_seed(0)
    model = SequenceFirstGRU()
    plain = copy.deepcopy(model).eval()
    wrapped = autopart.Module(model, stages=2, microbatches=2)
    (src, hidden), kwargs = ANY_ZOO["gru_seq_first"][1](3 + rank, seed=rank)
    wrapped(src=src, hidden=hidden, targets=kwargs["targets"])[0].backward()
    wrapped.eval()
    plain.load_state_dict(wrapped.state_dict())
    with torch.no_grad():
        logits, state = wrapped(src, hidden)
        want_logits, want_state = plain(src, hidden)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(state, want_state)


@pytest.mark.multirank
def test_a_later_call_may_pass_the_batch_by_position():
    run_ranks(2, _train_by_keyword_then_call_by_position)


class _PoolsAwayTheSequence(nn.Module):
    """A branch that mixes rows (``if pad.any()`` over the whole batch) and a sequence pooled
    away: neither dimension passes the row check, and dimension 1 must not win because its
    cut leaves the outputs' shape (with two classes, as many as the rows tried) unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.out = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, ids):
        h = torch.relu(self.fc(self.embed(ids)))
        pad = ids == 0
        if pad.any():
            h = h.masked_fill(pad.unsqueeze(-1), 0.0).sum(1) / (~pad).sum(1, keepdim=True)
        else:
            h = h.mean(1) * 2.0
        return self.out(h)


def test_a_cut_whose_outputs_lose_the_rows_is_not_the_batch():
    from autopart.capture.row_check import rows_are_independent

    ids = torch.randint(1, 16, (4, 5), generator=torch.Generator().manual_seed(0))
    ids[0, 3:] = 0
    model = _PoolsAwayTheSequence()
    ok, why = rows_are_independent(model, (ids,), {}, (1,))
    assert not ok and "do not keep these rows" in why
    assert find_batch_dims(model, (ids,), {}) == (4, (0,))


class _SelectsTheLastEos(nn.Module):
    """BART's classification head: the hidden states at the end-of-sequence tokens, picked
    with a boolean mask (a size read from data, which export bounds by the batch's range)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 2)

    def forward(self, ids):
        h = self.embed(ids)
        eos = ids.eq(2)
        picked = h[eos, :].view(h.size(0), -1, h.size(-1))[:, -1, :]
        return self.head(picked)


def test_a_size_read_from_data_does_not_stop_a_microbatch_of_one_row():
    ids = torch.randint(3, 16, (3, 6))
    ids[:, -1] = 2
    model = _SelectsTheLastEos()
    graph = capture(model, (ids,))
    torch.testing.assert_close(graph.fx_module(ids[:1]), model(ids[:1]))
