"""Per-rank bodies for the meta-device and checkpoint tests (`test_meta_models.py`)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import autopart
from autopart.runtime.stage.materialize import needed_names
from ddp_oracle import compare_outputs, loss_of, sgd, train_like_ddp
from equivalence import assert_close
from hf_zoo import HF_ZOO


def build_on_meta(name: str):
    build, _ = HF_ZOO[name]
    with torch.device("meta"):
        return build()


def reference_from(name: str, weights: Path):
    """The plain model with the checkpoint's weights (its tied weights re-tied by loading)."""
    build, _ = HF_ZOO[name]
    model = build()
    values = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights)
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not unexpected and all("lm_head" in key for key in missing), (missing, unexpected)
    return model


def check_stage_only(wrapped: autopart.Module) -> None:
    """Exactly this rank's tensors are real; every other stage's stay on meta."""
    needed = needed_names(wrapped.graph, wrapped.plan, wrapped.rank)
    for key, tensor in (*wrapped.model.named_parameters(), *wrapped.model.named_buffers()):
        canonical = wrapped.names[key]
        assert tensor.is_meta == (canonical not in needed), (wrapped.rank, key, tensor.device)


def meta_from_checkpoint_trains_like_ddp(
    rank: int,
    world: int,
    name: str,
    stages: int,
    weights: str,
    factory: bool,
    reference: str,
    options: dict,
) -> None:
    """A meta-built model loaded from ``weights`` trains exactly like DDP over the plain model
    with the same weights, evaluates like it mid-training, and holds only its stage."""
    _, make_batch = HF_ZOO[name]
    model = build_on_meta(name)
    reference = reference_from(name, Path(reference))
    optimizer = sgd if factory else sgd(model.parameters())
    wrapped = autopart.Module(
        model, optimizer, stages=stages, microbatches=2, checkpoint=weights, **options
    )
    label = f"{name} from {Path(weights).name}, {stages} stage(s)"
    train_like_ddp(wrapped, reference, make_batch, [3, 3], rank, world, label)
    check_stage_only(wrapped)
    tied = getattr(model, "lm_head", None), model.get_input_embeddings()
    if model.config.tie_word_embeddings and not tied[1].weight.is_meta:
        head = tied[0].weight
        assert head.is_meta or head is tied[1].weight, "the tied head was materialized apart"
    wrapped.eval()
    reference.eval()
    args, kwargs = make_batch(3 + rank, seed=7)
    with torch.no_grad():
        compare_outputs(wrapped(*args, **kwargs), reference(*args, **kwargs), f"{name} eval")
    check_stage_only(wrapped)  # the evaluation's own capture allocated nothing


def meta_initializer(rank: int, world: int, name: str, stages: int, options: dict) -> None:
    """Without a checkpoint, the model's own initializer fills this rank's stage: replicas
    and the stages sharing a tied weight agree, and the deterministic buffers (rotary
    frequencies, position ids) equal those of plain construction."""
    _, make_batch = HF_ZOO[name]
    model = build_on_meta(name)
    wrapped = autopart.Module(model, sgd, stages=stages, microbatches=2, **options)
    torch.manual_seed(rank)  # the ranks draw different values: only the broadcast aligns them
    args, kwargs = make_batch(3, seed=rank)
    loss_of(wrapped(*args, **kwargs)).backward()
    check_stage_only(wrapped)
    full = wrapped.state_dict()  # gathered from the owners
    mine = {k: v for k, v in wrapped.model.state_dict().items() if not v.is_meta}
    for key, value in mine.items():
        assert torch.equal(value.cpu(), full[key]), f"rank {rank} disagrees with the owner on {key}"
    with warnings.catch_warnings():  # a full state dict loads without a warning per meta tensor
        warnings.simplefilter("error")
        wrapped.load_state_dict(full)
    plain = HF_ZOO[name][0]()
    buffers = dict(plain.named_buffers())
    for key, value in wrapped.model.named_buffers():  # rotary frequencies, position ids
        if not value.is_meta:
            assert torch.equal(value.cpu(), buffers[key]), f"buffer {key} differs from plain"
    for key, value in plain.state_dict().items():
        got = full[key]
        assert torch.isfinite(got.float()).all(), key
        if value.is_floating_point() and value.dim() >= 2 and value.std() > 0:
            if value.numel() >= 512:  # random: drawn from the same distribution
                ratio = float(got.std() / value.std())
                assert 0.8 < ratio < 1.25, f"{key}: std {got.std():.4f} vs {value.std():.4f}"
        else:
            assert torch.equal(got, value), f"{key} differs from plain construction"
    dist.barrier()


def four_stage_run_allocates_only_its_stage(rank: int, world: int) -> None:
    model = build_on_meta("gpt2_deep")
    wrapped = autopart.Module(model, sgd, stages=world, microbatches=2)
    args, kwargs = HF_ZOO["gpt2_deep"][1](2, seed=rank)
    loss_of(wrapped(*args, **kwargs)).backward()
    wrapped.optimizer.step()
    check_stage_only(wrapped)
    held = {wrapped.names[k] for k, t in model.named_parameters() if not t.is_meta}
    assert held == set(wrapped.plan.stage_of_rank(rank).params) & held
    assert len(held) < len(wrapped.graph.params) // 2, "a rank holds most of the model"


def expect_error(rank: int, world: int, name: str, weights: str, fragment: str) -> None:
    model = build_on_meta(name)
    wrapped = autopart.Module(model, sgd, stages=world, microbatches=1, checkpoint=weights)
    args, kwargs = HF_ZOO[name][1](2, seed=rank)
    try:
        wrapped(*args, **kwargs)
    except autopart.AutopartError as err:
        assert fragment in str(err), str(err)
    else:
        raise AssertionError(f"no error for {weights}")


# -- sharded checkpoints --------------------------------------------------------------------


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _trained(name: str, stages: int, seed: int, steps: int, rank: int, world: int):
    build, make_batch = HF_ZOO[name]
    torch.manual_seed(seed)
    wrapped = autopart.Module(build(), _adam, stages=stages, microbatches=2)
    for step in range(steps):
        args, kwargs = make_batch(3, seed=10 * step + rank)
        loss_of(wrapped(*args, **kwargs)).backward()
        wrapped.optimizer.step()
        wrapped.optimizer.zero_grad()
    if steps == 0:  # the plan is made on the first call
        args, kwargs = make_batch(3, seed=rank)
        with torch.no_grad():
            wrapped(*args, **kwargs)
    return wrapped


def dcp_round_trip_reshards(rank: int, world: int, path: str, plain_path: str) -> None:
    """Save under 2 stages, load into 1 stage x 2 replicas of a differently seeded model:
    weights and optimizer state equal, the next step equal; the checkpoint converts to a
    plain state dict that the unwrapped model loads."""
    name = "gpt2"
    first = _trained(name, 2, seed=0, steps=2, rank=rank, world=world)
    autopart.save_checkpoint(path, first, first.optimizer)
    second = _trained(name, 1, seed=1, steps=0, rank=rank, world=world)
    before = second.state_dict()
    autopart.load_checkpoint(path, second, second.optimizer)
    want, got = first.state_dict(), second.state_dict()
    assert any(not torch.equal(before[k], want[k]) for k in want), "the seeds gave equal models"
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} after the reshard"
    want_opt, got_opt = first.optimizer_state_dict(), second.optimizer_state_dict()
    assert want_opt["state"].keys() == got_opt["state"].keys()
    for index, state in want_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(got_opt["state"][index][key], value), (index, key)
    args, kwargs = HF_ZOO[name][1](3, seed=99 + rank)
    for model in (first, second):
        loss_of(model(*args, **kwargs)).backward()
        model.optimizer.step()
    after_first, after_second = first.state_dict(), second.state_dict()
    for key in after_first:
        assert_close(after_second[key], after_first[key], f"{key} one step after resuming")
    # The checkpoint also starts a meta-built model (checkpoint= reads DCP directories).
    third = autopart.Module(build_on_meta(name), sgd, stages=2, microbatches=1, checkpoint=path)
    with torch.no_grad():
        third(*HF_ZOO[name][1](2, seed=rank)[0])
    for key, value in third.state_dict().items():
        assert torch.equal(value, want[key]), f"{key} from checkpoint={Path(path).name}"
    if rank == 0:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, plain_path)
        saved = torch.load(plain_path, weights_only=False)
        plain = HF_ZOO[name][0]()
        plain.load_state_dict(saved["model"])  # strict: every key of the unwrapped model
        for key, value in plain.state_dict().items():
            assert torch.equal(value, want[key]), f"{key} from dcp_to_torch_save"
    dist.barrier()


def refuses_another_models_checkpoint(rank: int, world: int, path: str) -> None:
    """Also: two replicas of one stage write the model and its Adam state once, not twice."""
    first = _trained("gpt2", 1, seed=0, steps=1, rank=rank, world=world)
    autopart.save_checkpoint(path, first, first.optimizer)
    once = 3 * sum(p.numel() * p.element_size() for p in first.model.parameters())
    written = sum(f.stat().st_size for f in Path(path).glob("*.distcp"))
    # DCP frames every item (about 0.6x more on a model this small); a copy per replica
    # would double all of it, to over 3x.
    assert once < written < 2 * once, (written, once)
    other = _trained("llama", 1, seed=0, steps=0, rank=rank, world=world)
    try:
        autopart.load_checkpoint(path, other, other.optimizer)
    except autopart.AutopartError as err:
        assert "does not fit this model" in str(err), str(err)
    else:
        raise AssertionError("a GPT-2 checkpoint loaded into Llama")


def save_dies_on_rank1(rank: int, world: int, path: str) -> None:
    """Rank 1 dies in the middle of a save; rank 0 must not leave a complete-looking one."""
    import torch.distributed.checkpoint as dcp

    model = _trained("gpt2", 2, seed=0, steps=1, rank=rank, world=world)
    if rank == 1:
        real_save = dcp.save

        def dying_save(*args, **kwargs):
            os._exit(3)

        dcp.save = dying_save
        del real_save
    autopart.save_checkpoint(path, model, model.optimizer)


def rank0_stream(rank: int, world: int) -> None:
    """``state_dict(rank0_only=True)`` gives rank 0 the full dict, one rank's part per
    message, and the others nothing; it equals the every-rank gather."""
    received: list[int] = []
    real_recv = dist.recv_object_list

    def counting_recv(box, src=None, **kwargs):
        result = real_recv(box, src=src, **kwargs)
        received.append(sum(t.numel() for t in box[0].values()))
        return result

    dist.recv_object_list = counting_recv
    model = _trained("gpt2", world, seed=0, steps=1, rank=rank, world=world)
    full = model.state_dict()
    streamed = model.state_dict(rank0_only=True)
    if rank != 0:
        assert streamed == {}
        return
    assert list(streamed) == list(full)
    for key in full:
        assert torch.equal(streamed[key], full[key]), key
    stage_elements = [
        sum(math.prod(model.graph.params[n].shape) for n in stage.params)
        for stage in model.plan.stages
    ]
    assert len(received) == world - 1, received
    assert max(received) <= max(stage_elements), (received, stage_elements)
