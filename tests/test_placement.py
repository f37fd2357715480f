"""The placement contract on a pretend GPU (`pretend_gpu`): capture does not depend on where
the model and its inputs are, stage modules point every op at the stage's device (in the
bodies of higher-order ops too), and measured costs never stop a wrap."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import hf_zoo
from autopart.capture import capture
from autopart.config import Config
from autopart.cost import AnalyticCostModel, MeasuredCostModel, get_device_spec
from autopart.cost.measured import UnmeasurableBlock
from autopart.device import capture_device
from autopart.errors import AutopartError
from autopart.plan.planner import PlanOptions, make_plan
from autopart.runtime import plan_agreement
from autopart.runtime.stage.graph_cut import build_stage_module, stage_ios
from pretend_gpu import CUDA, on_pretend_gpu

SPEC = get_device_spec("h100")


class Rotary(nn.Module):
    """Rotary embeddings as Llama, Mistral and Qwen2 wrote them in transformers 5.17: a
    ``no_grad`` method with an autocast region switched off for the device of ``x``, which
    export captures as higher-order ops whose bodies name the trace's device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(4), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        inv = self.inv_freq[None, :, None].float().expand(pos.shape[0], -1, 1).to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv.float() @ pos[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype)


class RotaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.rotary = Rotary()
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        return self.out(self.inp(x) * self.rotary(x, pos))


class AutocastOff(nn.Module):
    """An autocast region switched off at the top level of forward (no ``no_grad`` around
    it): a higher-order op whose device-type string must survive the meta run."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.inp(x).float().relu()


def rotary_net():
    return RotaryNet(), ((torch.randn(3, 5, 8),), {})


def hf(name):
    build, batch = hf_zoo.HF_ZOO[name]
    return lambda: (build(), batch(4, 0))


MODELS = {
    "autocast_off": lambda: (AutocastOff(), ((torch.randn(3, 8),), {})),
    "rotary": rotary_net,
    "gpt2": hf("gpt2"),
    "llama": hf("llama"),
    "t5": hf("t5"),
}


def _code(gm: torch.fx.GraphModule) -> str:
    """The code of ``gm`` and of every higher-order op's body in it."""
    return "\n".join(
        sub.code for _, sub in gm.named_modules() if isinstance(sub, torch.fx.GraphModule)
    )


def _devices(gm: torch.fx.GraphModule) -> set[str]:
    """Every device an op of ``gm`` (or of a body in it) names, and autocast's device type."""
    found = set()
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            leaves = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
            found |= {str(v) for v in leaves if isinstance(v, torch.device)}
            if "autocast" in str(node.target):
                found.add(f"autocast:{node.args[0]}")
    return found


@pytest.mark.parametrize("name", sorted(MODELS))
def test_capture_with_inputs_on_the_gpu_gives_the_cpu_graph(name):
    """A model on the CPU called with its batch on the GPU is the usual way to hand a model
    that does not fit to a wrapper; the graph must be the one CPU inputs give."""
    model, (args, kwargs) = MODELS[name]()
    on_cpu = capture(model, args, kwargs)
    on_gpu = capture(
        model, *on_pretend_gpu((args, kwargs), FakeTensorMode(allow_non_fake_inputs=True))
    )
    assert _code(on_gpu.fx_module) == _code(on_cpu.fx_module)
    assert [n.name for n in on_gpu.nodes] == [n.name for n in on_cpu.nodes]


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_a_model_built_on_meta_names_only_the_cpu(name):
    """A meta-built model's trace names meta; the captured graph names the CPU, as any."""
    with torch.device("meta"):
        model, (args, kwargs) = MODELS[name]()
    assert capture_device(model).type == "meta"
    captured = capture(model, args, kwargs)  # inputs on the CPU: moved to meta to trace
    assert _devices(captured.fx_module) == {"cpu"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stage_modules_point_every_op_at_the_stage_device(name):
    """Llama on the GPU failed because the bodies of its rotary embedding's ``no_grad`` and
    autocast regions kept the trace's device; every op of every stage must name the stage's."""
    model, (args, kwargs) = MODELS[name]()
    graph = capture(model, args, kwargs)
    options = PlanOptions(devices=2, global_batch=4, stages=2)
    plan = make_plan(graph, AnalyticCostModel(SPEC), options)
    named = set()
    for io in stage_ios(graph, plan):
        module = build_stage_module(graph, io, CUDA)
        named |= _devices(module)
        assert "_assert_tensor_metadata" not in _code(module)
    assert named <= {"cuda:0", "autocast:cuda"}
    if name in ("rotary", "autocast_off"):
        assert "autocast:cuda" in named
    assert _devices(graph.fx_module) <= {"cpu", "autocast:cpu"}  # the capture is untouched


def test_a_model_on_two_devices_is_refused_with_what_to_do():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].to("meta")
    assert capture_device(model).type == "meta"  # meta wins: it is captured there
    with FakeTensorMode():
        model[1].weight = nn.Parameter(torch.empty(2, 2, device=CUDA))
    model[1].bias = nn.Parameter(torch.empty(2))
    with pytest.raises(AutopartError, match=r"several devices.*put the whole model on one"):
        capture_device(model)


# -- measured costs never stop a wrap ---------------------------------------------------------


def _mlp_graph():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return capture(model, (torch.randn(4, 8),))


def test_a_block_that_cannot_be_measured_is_costed_analytically(tmp_path, monkeypatch, caplog):
    """Measured at no size, a block costs what the analytic model says, scaled by how the
    measured blocks compared with it; one warning names it; the plan says so."""
    graph = _mlp_graph()
    measured = MeasuredCostModel(graph, "cpu", cache_dir=tmp_path, spec=SPEC)
    analytic = AnalyticCostModel(SPEC)
    ops = [n for n in graph.nodes if n.op.startswith("aten.")]
    good, bad = ops[:1], ops[1:]
    original = MeasuredCostModel._run

    def fail_bad(self, names, batch):
        if names[0] == bad[0].name:
            raise UnmeasurableBlock(f"measuring {names[0]} .. {names[-1]} failed: out of memory")
        return original(self, names, batch)

    monkeypatch.setattr(MeasuredCostModel, "_run", fail_bad)
    measured_good = sum(measured.block_seconds(good, 4))
    ratio = measured_good / sum(analytic.block_seconds(good, 4))
    with caplog.at_level(logging.WARNING, logger="autopart"):
        for batch in (2, 3, 8):
            got = measured.block_seconds(bad, batch)
            want = [t * ratio for t in analytic.block_seconds(bad, batch)]
            assert got == pytest.approx(want, rel=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert len(warnings) == 1 and bad[0].name in warnings[0]
    assert measured.source == "measured (1 block(s) partly estimated)"


def test_a_block_too_big_at_one_size_scales_from_the_size_measured(tmp_path, monkeypatch):
    """Out of memory at 2x rows: the block keeps its measured time at x rows, in
    proportion to rows, not the analytic model's (which is several times off)."""
    graph = _mlp_graph()
    measured = MeasuredCostModel(graph, "cpu", cache_dir=tmp_path, spec=SPEC)
    block = [n for n in graph.nodes if n.op.startswith("aten.")]
    original = MeasuredCostModel._run

    def fail_big(self, names, batch):
        if batch > 4:
            raise UnmeasurableBlock(f"measuring at batch {batch} failed: out of memory")
        return original(self, names, batch)

    monkeypatch.setattr(MeasuredCostModel, "_run", fail_big)
    at_four = measured.block_seconds(block, 4)
    assert measured.block_seconds(block, 6) == pytest.approx([t * 1.5 for t in at_four])


def test_measured_costs_of_a_graph_that_cannot_be_measured_fall_back(caplog):
    """An fx-captured graph has no symbolic batch to profile at; the wrap plans anyway."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    graph = capture(model, (torch.randn(4, 8),), method="fx")
    config = Config(cost="measured")
    with caplog.at_level(logging.WARNING, logger="autopart"):
        chosen = plan_agreement._cost_model(graph, config, SPEC, torch.device("cpu"))
    assert chosen.source == "analytic"
    assert any("analytic costs instead" in r.getMessage() for r in caplog.records)
