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


def test_an_input_whose_batch_dimension_cannot_be_told_is_named():
    x = torch.randn(4, 5)
    pairs = torch.randn(6, 4, 4)  # the batch of 4 rows: dimension 1 or 2?
    with pytest.raises(CaptureError, match=r"kwargs\['pairs'\].*dimensions \[1, 2\].*batch_dims"):
        capture(_TwoInputs(), (x,), {"pairs": pairs})


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
    """Teeth: on (seq, batch) the sequence is dimension 0 and the check must reject it."""
    model = SequenceFirstLSTM()
    x = torch.randn(8, 8, 6)  # seq == batch: only running the halves tells them apart
    assert find_batch_dims(model, (x,), {}) == (8, (1,))
    gru = SequenceFirstGRU()
    assert find_batch_dims(gru, (torch.randint(0, 64, (5, 4)), torch.randn(2, 4, 16)), {})[1] == (
        1,
        1,
    )
