"""The planner at scale: honest infeasibility, cuts where a human would cut."""

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from autopart.capture import capture
from autopart.cost import AnalyticCostModel, get_device_spec
from autopart.plan.atomic import atomic_components
from autopart.plan.infeasible import infeasible_message
from autopart.plan.planner import PlanOptions, manual_blocks, microbatch_options, prepare
from autopart.plan.stage_dp import search
from exhaustive import exhaustive


@pytest.fixture(scope="module")
def layered():
    """Five MLP layers whose activations outweigh their weights, so that a stage that does not
    fit one device fits on more replicas (fewer rows each): cut at every layer boundary."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)) for _ in range(5)]
    )
    graph = capture(model, (torch.randn(1, 256, 32),))
    blocks = manual_blocks(graph, atomic_components(graph), tuple(str(i) for i in range(1, 5)))
    return graph, blocks


@pytest.mark.parametrize("cap_kib", [3000, 2500, 1500])
def test_suggested_device_count_is_the_fewest_any_layer_boundary_plan_needs(layered, cap_kib):
    """On one device nothing fits; the message's device count is checked against brute force
    over every layer-boundary plan, replica split and microbatch count on 1, 2, ... devices:
    it must be no fewer than the true minimum (else it promises what cannot fit) and within
    1.5x of it (the planner's count is exact here)."""
    graph, blocks = layered
    cost = AnalyticCostModel(get_device_spec("h100", memory_bytes=cap_kib * 1024))
    options = PlanOptions(devices=1, global_batch=32)
    counts = microbatch_options(options)
    _, _, coster = prepare(graph, cost, options, blocks=blocks)
    assert search(len(blocks), 1, coster, counts) is None
    message = infeasible_message(graph, blocks, coster, options, counts)
    suggested = int(re.search(r"use about (\d+) devices", message).group(1))
    fewest = None
    for devices in range(1, 2 * suggested):
        _, _, wider = prepare(graph, cost, replace(options, devices=devices), blocks=blocks)
        if exhaustive(len(blocks), devices, wider, counts) is not None:
            fewest = devices
            break
    assert fewest is not None, message
    assert fewest <= suggested <= 1.5 * fewest, message


#: A child of a repeated layer: its attention, MLP or a norm.
SUB_BLOCK = re.compile(r"^(.*\.\d+\.[^.]+)(?:\.|$)")
LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _hf(kind: str):
    """GPT-2 and Llama at their default configuration but for size: 4 layers of width 128."""
    import transformers as tf

    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=64, vocab_size=512)
        model = tf.GPT2LMHeadModel(config)
    else:
        config = tf.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = tf.LlamaForCausalLM(config)
    ids = torch.randint(0, 512, (1, 64))
    return capture(model, (ids,), {"labels": ids})


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_no_stage_boundary_inside_an_attention_or_mlp(kind):
    """However the planner is squeezed (forced stage counts up to one per half layer, or
    memory that forces up to 8 stages while cuts between sub-blocks still fit), every stage
    boundary lies between sub-blocks: never inside an attention, an MLP or a norm, and never
    where more bytes cross than at the layer's start (the residual stream and the mask)."""
    from autopart.plan.planner import partition
    from autopart.plan.traffic import cut_bytes

    graph = _hf(kind)
    components = atomic_components(graph)
    paths = [graph.node(c.anchor).module_path for c in components]
    cuts = cut_bytes(graph, {c.anchor: i for i, c in enumerate(components)}, len(components))

    layer_of = [m.group(1) if (m := LAYER.match(path)) else None for path in paths]

    def at_layer_start(p: int) -> float:
        """The bytes crossing into the layer at boundary ``p``: the residual stream (and what
        every layer reads, such as the mask)."""
        key = layer_of[p] or layer_of[p - 1]
        return float(cuts[layer_of.index(key)] if key else cuts[p])

    state = 4 * graph.param_bytes
    cases = [dict(devices=8, stages=s) for s in (2, 4, 6, 8)]
    cases += [dict(devices=8, device_memory=int(state / f)) for f in (1.25, 2, 2.5)]
    checked = 0
    for case in cases:
        memory = case.pop("device_memory", None)
        cost = AnalyticCostModel(get_device_spec("h100", memory_bytes=memory))
        part = partition(graph, cost, PlanOptions(global_batch=16, **case))
        for stage in part.solution.stages[1:]:
            p = part.blocks[stage.start].start
            before, after = SUB_BLOCK.match(paths[p - 1]), SUB_BLOCK.match(paths[p])
            where = f"{case}: a stage starts at {paths[p]!r} after {paths[p - 1]!r}"
            assert not (before and after and before.group(1) == after.group(1)), where
            least = at_layer_start(p)
            assert cuts[p] <= least * 1.01, f"{where}: {cuts[p]:.0f} bytes cross, not {least:.0f}"
            checked += 1
    assert checked >= 20
