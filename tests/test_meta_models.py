"""Models built on the meta device, materialized one stage per rank, and sharded checkpoints.

A model built under ``torch.device("meta")`` has no values: each rank allocates only its own
stage's tensors, from a checkpoint (safetensors file or sharded directory, torch.save file)
or from the model's own initializer, and then trains exactly like DDP over the plain model
with the same weights.  Sharded checkpoints go through torch.distributed.checkpoint and load
under another plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import autopart
import meta_workers as workers
from autopart.runtime.stage.tensor_sources import CheckpointError, open_checkpoint
from hf_zoo import HF_ZOO
from multirank import run_ranks, run_ranks_unjoined


def _save_plain(name: str, path: Path, layout: str) -> Path:
    """The plain model's weights (seed 0) as a user would have them on disk."""
    torch.manual_seed(0)
    model = HF_ZOO[name][0]()
    values, seen = {}, set()
    for key, value in model.state_dict().items():  # a tied weight once, as HF saves it
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            values[key] = value.contiguous()
    if layout == "safetensors":
        save_file(values, path / "model.safetensors")
        return path / "model.safetensors"
    if layout == "sharded":  # the Hugging Face layout: shards and their index
        keys = sorted(values)
        halves = {"model-00001-of-00002.safetensors": keys[::2]}
        halves["model-00002-of-00002.safetensors"] = keys[1::2]
        weight_map = {}
        for file, names in halves.items():
            save_file({k: values[k] for k in names}, path / file)
            weight_map.update(dict.fromkeys(names, file))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return path
    torch.save(values, path / "model.pt")
    return path / "model.pt"


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stages", "layout", "factory", "options"),
    [
        ("gpt2", 1, "safetensors", True, {"offload": True}),
        ("gpt2", 2, "sharded", False, {}),
        ("llama", 2, "torch", True, {}),
    ],
)
def test_meta_model_from_checkpoint_trains_like_ddp(
    tmp_path, name, stages, layout, factory, options
):
    """GPT-2 ties its head to the embedding (the checkpoint stores it once, and both stages
    hold it); Llama's rotary frequencies are in no checkpoint and come from the initializer.
    Offloaded stages materialize in host memory."""
    weights = _save_plain(name, tmp_path, layout)
    # The reference reads the same values from one file.
    reference = _save_plain(name, tmp_path, "safetensors") if layout == "sharded" else weights
    run_ranks(
        2,
        workers.meta_from_checkpoint_trains_like_ddp,
        name,
        stages,
        str(weights),
        factory,
        str(reference),
        options,
        timeout_s=300,
    )


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stages", "options"), [("llama", 1, {"zero": True}), ("bert_mlm", 2, {})]
)
def test_meta_model_without_checkpoint_uses_its_initializer(name, stages, options):
    """Llama with two ZeRO replicas (which must start equal), BERT over two stages."""
    run_ranks(2, workers.meta_initializer, name, stages, options, timeout_s=300)


@pytest.mark.multirank
@pytest.mark.slow
def test_four_stages_each_allocate_only_their_own():
    run_ranks(4, workers.four_stage_run_allocates_only_its_stage, timeout_s=300)


@pytest.mark.multirank
def test_missing_and_misshapen_checkpoint_tensors_are_named(tmp_path):
    torch.manual_seed(0)
    values = dict(HF_ZOO["gpt2"][0]().state_dict())
    values.pop("lm_head.weight")
    lacking = {k: v for k, v in values.items() if k != "transformer.h.0.mlp.c_fc.bias"}
    save_file(lacking, tmp_path / "lacking.safetensors")
    wrong = dict(values, **{"transformer.wpe.weight": torch.zeros(3, 32)})
    save_file(wrong, tmp_path / "wrong.safetensors")
    run_ranks(
        1,
        workers.expect_error,
        "gpt2",
        str(tmp_path / "lacking.safetensors"),
        "lacks 1 tensor(s) of this rank's stage: transformer.h.0.mlp.c_fc.bias",
    )
    run_ranks(
        1,
        workers.expect_error,
        "gpt2",
        str(tmp_path / "wrong.safetensors"),
        "holds transformer.wpe.weight with shape (3, 32)",
    )


class _Scaled(torch.nn.Module):
    """A parameter that no ``reset_parameters()`` covers."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.linear(x) * self.scale


def _uninitialized_parameter_is_named(rank: int, world: int) -> None:
    with torch.device("meta"):
        model = _Scaled()
    wrapped = autopart.Module(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(autopart.AutopartError, match="have no value after materialization: scale"):
        wrapped(torch.randn(2, 4))
    with torch.device("meta"):
        model = _Scaled()

    def init(module: _Scaled) -> None:
        module.scale.fill_(2.0)
        module.linear.reset_parameters()

    wrapped = autopart.Module(model, init_fn=init)
    out = wrapped(torch.randn(2, 4))
    assert torch.isfinite(out).all()
    assert torch.equal(model.scale.detach(), torch.full((4,), 2.0))


class _PartlyReal(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Linear(4, 4)
        self.register_buffer("counts", torch.zeros(4, dtype=torch.uint8))

    def forward(self, x):
        return self.second(self.first(x)) + self.counts


def _initializer_leaves_real_tensors_alone(rank: int, world: int) -> None:
    """Only the materialized tensors are initialized: a layer built for real keeps its values,
    and a uint8 buffer the initializer zeroes counts as set (0 is not its sentinel)."""
    with torch.device("meta"):
        model = _PartlyReal()
    model.second = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.second.weight.fill_(7.0)

    def init(module: _PartlyReal) -> None:
        module.first.reset_parameters()
        module.second.reset_parameters()  # on meta while it runs: a no-op
        module.counts.zero_()

    wrapped = autopart.Module(model, init_fn=init)
    assert torch.isfinite(wrapped(torch.randn(2, 4))).all()
    assert torch.equal(model.second.weight.detach(), torch.full((4, 4), 7.0))
    assert not model.first.weight.is_meta and torch.equal(model.counts, torch.zeros(4).byte())


@pytest.mark.multirank
def test_the_initializer_writes_only_the_tensors_it_materializes():
    run_ranks(1, _initializer_leaves_real_tensors_alone)


@pytest.mark.multirank
def test_one_stages_checkpoint_problem_stops_every_rank(tmp_path):
    torch.manual_seed(0)
    values = dict(HF_ZOO["gpt2"][0]().state_dict())
    values.pop("lm_head.weight")
    values.pop("transformer.ln_f.bias")  # read by the last stage only
    save_file(values, tmp_path / "lacking.safetensors")
    fragment = "lacks 1 tensor(s) of this rank's stage: transformer.ln_f.bias"
    run_ranks(2, workers.expect_error, "gpt2", str(tmp_path / "lacking.safetensors"), fragment)


@pytest.mark.multirank
def test_a_parameter_no_initializer_sets_is_an_error_and_init_fn_sets_it():
    run_ranks(1, _uninitialized_parameter_is_named)


def test_checkpoint_and_init_fn_need_a_meta_model():
    with pytest.raises(autopart.AutopartError, match="meta device"):
        autopart.Module(torch.nn.Linear(2, 2), checkpoint="x.safetensors")


def test_checkpoint_formats_read_only_the_keys_asked_for(tmp_path):
    values = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_file(values, tmp_path / "one.safetensors")
    torch.save({"model": values, "step": 3}, tmp_path / "nested.pt")
    for path in (tmp_path / "one.safetensors", tmp_path, tmp_path / "nested.pt"):
        source = open_checkpoint(path)
        assert source.keys() == {"a", "b"}
        assert torch.equal(source.read(["a"])["a"], values["a"])
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \.metadata file: its save did not finish"):
        open_checkpoint(partial)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


@pytest.mark.multirank
@pytest.mark.slow
def test_sharded_checkpoint_round_trip_reshards_and_converts(tmp_path):
    run_ranks(
        2,
        workers.dcp_round_trip_reshards,
        str(tmp_path / "ckpt"),
        str(tmp_path / "plain.pt"),
        timeout_s=300,
    )


@pytest.mark.multirank
@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path):
    run_ranks(2, workers.refuses_another_models_checkpoint, str(tmp_path / "ckpt"))


@pytest.mark.multirank
@pytest.mark.slow
def test_interrupted_save_leaves_no_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    codes = run_ranks_unjoined(2, workers.save_dies_on_rank1, str(path), timeout_s=120)
    assert codes[1] == 3 and codes[0] not in (0, None), codes
    assert not path.exists(), list(tmp_path.iterdir())
    partial = next(tmp_path.glob("ckpt.partial-*"), None)
    if partial is not None:
        with pytest.raises(CheckpointError, match=r"no \.metadata"):
            open_checkpoint(partial)


@pytest.mark.multirank
@pytest.mark.slow
def test_rank0_only_state_dict_streams_one_rank_at_a_time():
    run_ranks(2, workers.rank0_stream)
