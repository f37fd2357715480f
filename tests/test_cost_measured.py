import json
from pathlib import Path

import pytest
import torch

from autopart.cost import BUILTIN_SPECS, MeasuredCostModel
from autopart.cost.measured import DEFAULT_CACHE_DIR
from autopart.cost.subgraph import InputMaker, differentiable_nodes, extract_subgraph
from autopart.errors import AutopartError
from autopart.ir import Graph, Node, NodeKind, TensorSpec


def export_mlp(layout="module"):
    """The capture contract: torch.export with a symbolic batch, example batch 4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ep = torch.export.export(
        model,
        (torch.randn(4, 8),),
        dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
    )
    return ep.module() if layout == "module" else ep.graph_module


def ir_for(gm, user_inputs=1, fingerprint="mlp"):
    """A minimal IR whose node names are the fx node names, as capture builds it."""
    nodes = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.name for n in placeholders[-user_inputs:]]
    for fx_node in gm.graph.nodes:
        val = fx_node.meta.get("val")
        outputs = ()
        if isinstance(val, torch.Tensor):
            per_sample = (1, *[int(d) for d in val.shape[1:]])
            outputs = (TensorSpec(per_sample, str(val.dtype), batch_dim=0),)
        if fx_node.name in inputs:
            kind = NodeKind.INPUT
        elif fx_node.op == "output":
            kind = NodeKind.OUTPUT
        elif fx_node.op == "call_function":
            kind = NodeKind.BATCH
        else:
            continue
        nodes.append(
            Node(
                name=fx_node.name,
                op=str(fx_node.target),
                kind=kind,
                inputs=tuple(n.name for n in fx_node.all_input_nodes if n.op != "get_attr"),
                params=(),
                outputs=outputs,
                module_path="",
            )
        )
    graph = Graph(
        nodes=nodes,
        params={},
        inputs=inputs,
        outputs=["output"],
        fingerprint=fingerprint,
        capture_method="export",
        fx_module=gm,
    )
    return graph


def nodes(graph, *names):
    return [graph.node(name) for name in names]


@pytest.fixture
def mlp_graph():
    return ir_for(export_mlp())


@pytest.mark.parametrize("layout", ["module", "graph_module"])
def test_times_a_block_at_a_new_batch(tmp_path, layout):
    graph = ir_for(export_mlp(layout))
    model = MeasuredCostModel(graph, "cpu", cache_dir=tmp_path, spec=BUILTIN_SPECS["h100"])
    assert model.source == "measured"
    assert model.device.name == "h100"
    forward, backward = model.block_seconds(nodes(graph, "relu", "linear_1"), batch=8)
    assert forward > 0
    assert backward > 0
    profile = model.profile(nodes(graph, "linear", "relu", "linear_1"), batch=8)
    assert profile.forward_seconds > 0
    assert profile.peak_bytes is None  # CPU


def test_second_call_reads_the_cache(tmp_path, mlp_graph, monkeypatch):
    calls = []
    original = MeasuredCostModel._run

    def counting(self, names, batch):
        calls.append((tuple(names), batch))
        return original(self, names, batch)

    monkeypatch.setattr(MeasuredCostModel, "_run", counting)
    block = nodes(mlp_graph, "linear", "relu")
    first = MeasuredCostModel(mlp_graph, cache_dir=tmp_path).profile(block, 8)
    assert len(calls) == 1
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"]["batch"] == 8

    again = MeasuredCostModel(mlp_graph, cache_dir=tmp_path)
    assert again.profile(list(reversed(block)), 8) == first  # node order does not matter
    assert len(calls) == 1
    again.profile(block, 16)  # another batch is another measurement
    assert len(calls) == 2


def test_corrupt_cache_file_is_measured_again(tmp_path, mlp_graph):
    model = MeasuredCostModel(mlp_graph, cache_dir=tmp_path, iters=1)
    block = nodes(mlp_graph, "relu")
    model.profile(block, 2)
    (path,) = tmp_path.rglob("*.json")
    path.write_text("{not json")
    assert model.profile(block, 2).forward_seconds > 0
    assert json.loads(path.read_text())["profile"]["forward_seconds"] > 0


def test_default_cache_dir():
    assert DEFAULT_CACHE_DIR.parts[-3:] == (".cache", "autopart", "profiles")


def test_needs_a_captured_module(mlp_graph):
    mlp_graph.fx_module = None
    with pytest.raises(AutopartError, match="captured module"):
        MeasuredCostModel(mlp_graph)


def test_unknown_node_is_a_clear_error(tmp_path, mlp_graph):
    model = MeasuredCostModel(mlp_graph, cache_dir=tmp_path)
    stranger = Node("conv9", "conv", NodeKind.BATCH, (), (), (), "")
    with pytest.raises(AutopartError, match="conv9"):
        model.block_seconds([stranger], 2)


def test_static_capture_is_rejected():
    model = torch.nn.Linear(3, 3)
    gm = torch.export.export(model, (torch.randn(2, 3),)).module()
    with pytest.raises(AutopartError, match="symbolic batch"):
        MeasuredCostModel(ir_for(gm))


def test_subgraph_inputs_outputs_and_gradients():
    gm = export_mlp()
    block = extract_subgraph(gm, ["relu", "linear_1"])
    assert block.sources[0].name == "linear"
    assert any(s.op == "get_attr" for s in block.sources)  # parameters keep their real values
    grads = differentiable_nodes(gm)
    assert {"linear", "relu", "linear_1"} <= grads
    assert not any(n.op == "placeholder" and n.name in grads for n in gm.graph.nodes)

    symbols = _batch_symbols_of(gm)
    inputs, leaves = InputMaker(gm, symbols, grads).make(block, 8, torch.device("cpu"))
    assert inputs[0].shape == (8, 16)
    assert len(leaves) == 3  # the activation, the weight and the bias of linear_1
    (out,) = block.module(*inputs)
    assert out.shape == (8, 4)
    # The captured module's own parameters are untouched (copies are used).
    weight = dict(gm.named_parameters())["2.weight"]
    assert torch.equal(inputs[1], weight.detach())
    assert inputs[1].data_ptr() != weight.data_ptr()


def _batch_symbols_of(gm):
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return frozenset(placeholder.meta["val"].shape[0].node.expr.free_symbols)


class Folding(torch.nn.Module):
    """Folds the batch into another dimension, so a block input has size 3 * batch."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.embed = torch.nn.Embedding(10, 6)

    def forward(self, x, ids):
        b = x.shape[0]
        folded = self.proj(x.reshape(b * 3, 2))
        return folded.reshape(b, 6) + self.embed(ids).sum(1)


def test_symbolic_sizes_follow_the_batch(tmp_path):
    batch = torch.export.Dim("batch")
    ep = torch.export.export(
        Folding(),
        (torch.randn(4, 6), torch.zeros(4, 5, dtype=torch.long)),
        dynamic_shapes={"x": {0: batch}, "ids": {0: batch}},
    )
    gm = ep.module()
    graph = ir_for(gm, user_inputs=2, fingerprint="folding")
    compute = [n for n in graph.nodes if n.kind is NodeKind.BATCH]
    # Every block of a single op must run, with inputs (tensors, sizes, ids) made at batch 5.
    model = MeasuredCostModel(graph, cache_dir=tmp_path, warmup=0, iters=1)
    for node in compute:
        forward, _ = model.block_seconds([node], 5)
        assert forward > 0, node.name
    symbols = _batch_symbols_of(gm)
    view_names = [n.name for n in compute if "reshape" in n.name or "view" in n.name]
    last_reshape = extract_subgraph(gm, [view_names[-1]])
    inputs, _ = InputMaker(gm, symbols, differentiable_nodes(gm)).make(
        last_reshape, 5, torch.device("cpu")
    )
    assert inputs[0].shape == (15, 2)
    assert inputs[1] == 5  # the batch size, read by a node outside the block
    (out,) = last_reshape.module(*inputs)
    assert out.shape == (5, 6)


def test_blocks_without_ops_cost_nothing(tmp_path, mlp_graph):
    model = MeasuredCostModel(mlp_graph, cache_dir=tmp_path)
    inputs_only = [n for n in mlp_graph.nodes if n.kind in (NodeKind.INPUT, NodeKind.OUTPUT)]
    assert model.block_seconds(inputs_only, 4) == (0.0, 0.0)
    assert not list(tmp_path.rglob("*.json"))


def _wrapped_gpt2_costs(rank: int, world: int, cache: str, results: str) -> None:
    """cost='measured' plans a real model (GPT-2 with its own loss) from profiles of its
    blocks on this device, cached by model and device: a second wrapper measures nothing.
    cost='auto' on a CPU device stays analytic; measured costs of a meta model are refused."""
    import autopart
    import autopart.cost.measured as measured
    from hf_zoo import gpt2

    monkey = pytest.MonkeyPatch()
    monkey.setattr(measured, "DEFAULT_CACHE_DIR", Path(cache))
    runs = []
    real_run = measured.MeasuredCostModel._run
    monkey.setattr(
        measured.MeasuredCostModel, "_run", lambda self, *a: runs.append(a) or real_run(self, *a)
    )
    ids = torch.randint(0, 64, (4, 8))
    sources, counts = [], []
    for cost in ("measured", "measured", "auto"):
        torch.manual_seed(0)
        wrapped = autopart.Module(gpt2(), cost=cost)
        wrapped(ids, labels=ids).loss.backward()
        sources.append(wrapped.plan.cost_source)
        counts.append(len(runs))
    with torch.device("meta"):
        meta = gpt2()
    with pytest.raises(AutopartError, match="built on the meta device"):
        autopart.Module(meta, cost="measured")(ids, labels=ids)
    monkey.undo()
    Path(results).write_text(json.dumps([sources, counts]))


@pytest.mark.multirank
def test_measured_costs_plan_the_module_and_are_cached(tmp_path):
    from multirank import run_ranks

    results = tmp_path / "results.json"
    run_ranks(1, _wrapped_gpt2_costs, str(tmp_path / "cache"), str(results))
    sources, counts = json.loads(results.read_text())
    assert sources == ["measured", "measured", "analytic"]
    assert counts[0] > 0, "the first wrapper measured its blocks"
    assert counts[1] == counts[0] == counts[2], "the second one read them all from the cache"
    assert any((tmp_path / "cache").rglob("*.json"))
