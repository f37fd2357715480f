"""Real models and real losses, trained as users train them, equal DistributedDataParallel.

Hugging Face causal and masked LMs and T5 at their default configuration (so they return a cache),
with labels padded by -100 by a different amount in every row, unequal local batches, and
1 or 2 stages with 2 microbatches; and hand-written losses of every form autopart splits
into per-row terms.  Without that split, the token mean of a chunk is weighted by rows and
the very first loss differs.
"""

import logging

import pytest
import torch

from autopart.capture import capture
from ddp_oracle import OracleCase, eval_without_labels, run_oracles
from hf_zoo import HF_ZOO, LOSS_FORMS, LossForms, _loss_batch
from multirank import run_ranks

HF_MODELS = ("gpt2", "llama", "bert_mlm")
#: An encoder-decoder too (its cache is an EncoderDecoderCache); its evaluation needs decoder
#: inputs, so it trains here and is left out of the label-free evaluation.
TRAINED = (*HF_MODELS, "t5")


@pytest.mark.multirank
@pytest.mark.slow
def test_hugging_face_models_at_default_config_train_like_ddp():
    cases = [OracleCase(name, stages, 2) for name in TRAINED for stages in (1, 2)]
    run_ranks(2, run_oracles, cases, timeout_s=300)


@pytest.mark.multirank
@pytest.mark.slow
def test_every_loss_form_trains_like_ddp():
    cases = [
        OracleCase(f"loss_{form}", stages, 2 + stages % 2)
        for form in LOSS_FORMS
        for stages in (1, 2)
    ]
    run_ranks(2, run_oracles, cases, timeout_s=300)


@pytest.mark.multirank
@pytest.mark.slow
def test_small_and_uneven_batches_and_keywords_through_kwargs():
    """One-row chunks under a squeeze (the regression loss), a last batch smaller than
    microbatches x replicas (rows 1 and 2 for 4 microbatches), and keywords that only
    ``**kwargs`` takes (num_items_in_batch, output_hidden_states)."""
    cases = [
        OracleCase("squeezed_regression", 1, 2, step_rows=(3, 1)),
        OracleCase("squeezed_regression", 1, 4, step_rows=(4, 1)),  # an uneven last batch
        OracleCase("squeezed_regression", 2, 2, base_rows=1),
        OracleCase("gpt2_extras", 2, 2),
    ]
    run_ranks(2, run_oracles, cases, timeout_s=300)


@pytest.mark.multirank
def test_token_mean_on_one_rank_with_microbatches():
    run_ranks(1, run_oracles, [OracleCase("loss_token_mean", 1, 3, base_rows=5)])


@pytest.mark.parametrize("form", LOSS_FORMS)
def test_each_loss_form_is_split_and_the_graph_still_returns_it(form):
    model = LossForms(form)
    args, kwargs = _loss_batch(4, seed=3)
    graph = capture(model, args, kwargs)
    assert len(graph.reductions) == 1, graph.reductions
    (reduction,) = graph.reductions.values()
    for name in reduction.inputs():
        assert graph.node(name).kind.value in ("batch", "input")
    torch.testing.assert_close(graph.fx_module(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.multirank
@pytest.mark.parametrize("stages", [1, 2])
def test_an_unrecognized_scalar_is_the_row_weighted_chunk_mean_on_every_rank(stages):
    import runtime_workers

    run_ranks(2, runtime_workers.unsplit_scalar_is_the_chunk_mean, stages)


def test_an_unrecognized_scalar_is_named_in_a_warning(caplog):
    class Peak(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).amax()

    with caplog.at_level(logging.WARNING, logger="autopart"):
        graph = capture(Peak(), (torch.randn(3, 4),))
    assert not graph.reductions
    assert "amax" in caplog.text and "cannot split" in caplog.text


def test_default_config_cache_is_returned_as_none():
    build, make_batch = HF_ZOO["gpt2"]
    model = build()
    args, kwargs = make_batch(2, seed=0)
    graph = capture(model, args, kwargs)
    out = graph.fx_module(*args, **kwargs)
    expected = model(*args, **kwargs)
    assert type(out) is type(expected)
    assert getattr(out, "past_key_values", None) is None
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("name", [*HF_MODELS, "mode_dependent"])
def test_evaluation_without_labels_matches_the_plain_model_in_eval_mode(name, stages):
    """Dropout on (sdpa's dropout_p, LSTM and Transformer dropout, a Python branch on
    self.training): after a training step with labels, eval() and a call without labels give
    exactly the plain model's eval outputs, twice the same; training then resumes."""
    run_ranks(2, eval_without_labels, name, stages, timeout_s=300)


@pytest.mark.multirank
def test_evaluation_of_an_offloaded_model():
    """A new kind of call (eval, without labels) on offloaded stages: its own graph, its own
    fetches of the same host-resident parameters."""
    run_ranks(2, eval_without_labels, "gpt2", 2, {"offload": True}, timeout_s=300)
