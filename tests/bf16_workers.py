"""Workers for bf16 across stages on a real model: ALBERT cut at every place a split point
can name, against DDP of the same model under eager autocast."""

from __future__ import annotations

import copy

import torch

import autopart
from autopart.capture import capture
from autopart.plan.atomic import atomic_components
from autopart.plan.planner import manual_blocks

#: Relative error in norm a bf16 gradient may have; a doubled or zeroed one is off by 1.
BF16_REL = 0.02
VOCAB = 64


def albert():
    """`AlbertForMaskedLM` from a tiny config, every other option at its default."""
    from transformers import AlbertConfig, AlbertForMaskedLM

    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return AlbertForMaskedLM(config)


def _masked(rows: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, 8), generator=gen)
    labels = torch.where(torch.rand(rows, 8, generator=gen) < 0.5, ids, -100)
    return {"input_ids": ids, "labels": labels}


def split_paths(model: torch.nn.Module, call: dict[str, torch.Tensor]) -> list[str]:
    """One module path for every distinct place a single split point can cut the model."""
    graph = capture(model, (), call)
    components = atomic_components(graph)
    paths: dict[int, str] = {}
    for component in components:
        path = graph.node(component.anchor).module_path
        if not path:
            continue
        start = manual_blocks(graph, components, [path])[1].start
        paths.setdefault(start, path)
    return list(paths.values())


def albert_bf16_at_every_cut(rank: int, world: int) -> None:
    """ALBERT (tied decoder bias, shared layers) under bf16 at 2 stages, cut at each place a
    split point can name: the logits equal eager autocast's and the gradients DDP's."""
    torch.manual_seed(0)
    paths = split_paths(albert(), _masked(4, 0))
    assert "albert.encoder.embedding_hidden_mapping_in" in paths, paths
    batches = [_masked(3 + r, seed=r) for r in range(world)]
    for path in paths:
        torch.manual_seed(0)
        model = albert()
        reference = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped = autopart.Module(
            model, opt, split_points=[path], microbatches=1, precision="bf16", cost="analytic"
        )
        out = wrapped(**batches[rank])
        out.loss.backward()
        assert wrapped.plan.num_stages == 2, path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [reference(**batch) for batch in batches]
        (sum(o.loss for o in outs) / world).backward()
        # One microbatch: the stages run this rank's rows through the ops eager autocast
        # runs, each reading its inputs in the dtype eager autocast reads them, so the
        # logits are the same to the bit (a bf16 value widened on its way to the next stage
        # changes them at most cuts).
        assert torch.equal(out.logits, outs[rank].logits), f"cut at {path}: logits differ"
        expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        # Attention's key bias has a zero gradient in exact arithmetic (softmax ignores it):
        # a gradient is compared against at least 1 % of the largest one's norm.
        floor = 0.01 * max(float(g.norm()) for g in expected.values())
        for name, param in wrapped.named_parameters():
            assert param.grad is not None, f"cut at {path}: no gradient of {name}"
            err = float((param.grad - expected[name]).norm()) / max(
                float(expected[name].norm()), floor
            )
            assert err < BF16_REL, f"cut at {path}: grad of {name} off by {err:.3g} (relative)"
