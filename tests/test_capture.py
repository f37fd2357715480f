import math
import os

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import autopart.capture.common as capture_common
import autopart.capture.meta_runner as capture_meta_runner
from autopart.capture import capture
from autopart.capture.branches import BranchTaken
from autopart.errors import CaptureError
from autopart.ir import Graph, NodeKind, TensorSpec
from zoo import ZOO, gpt2_tiny, mlp, tied

ALL = sorted(ZOO)


@pytest.fixture(scope="module")
def graphs() -> dict[str, Graph]:
    return {name: capture(*ZOO[name]()) for name in ALL}


def _at_batch(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """Fresh inputs with ``batch`` samples, shaped like the batch-1 examples."""
    generator = torch.Generator().manual_seed(batch)

    def grow(value):
        if not isinstance(value, torch.Tensor):
            return value
        rows = value.repeat(batch, *([1] * (value.dim() - 1)))
        if value.is_floating_point():
            return rows + torch.randn(rows.shape, generator=generator)
        return torch.randint(0, int(value.max()) + 1, rows.shape, generator=generator)

    return pytree.tree_map(grow, (args, kwargs))


def _assert_runs_like(graph: Graph, model: nn.Module, args: tuple, kwargs: dict) -> None:
    _assert_same(graph.fx_module(*args, **kwargs), model(*args, **kwargs))


def _assert_same(actual, expected) -> None:
    got = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# --- every zoo model --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_zoo_model_runs_at_other_batch_sizes(name, graphs):
    model, args, kwargs = ZOO[name]()
    graph = graphs[name]
    assert graph.capture_method == "export"
    assert graph.static_batch is None
    for batch in (3, 5):
        batch_args, batch_kwargs = _at_batch(args, kwargs, batch)
        _assert_same(
            graph.fx_module(*batch_args, **batch_kwargs), model(*batch_args, **batch_kwargs)
        )


@pytest.mark.parametrize("name", ALL)
def test_zoo_graph_is_well_formed(name, graphs):
    graph = graphs[name]
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == len(names)
    seen: set[str] = set()
    for node in graph.nodes:
        assert set(node.inputs) <= seen, f"{node.name} reads a later node"
        assert set(node.params) <= set(graph.params)
        seen.add(node.name)
    assert [graph.node(n).kind for n in graph.inputs] == [NodeKind.INPUT] * len(graph.inputs)
    assert graph.nodes[-1].kind is NodeKind.OUTPUT
    assert set(graph.outputs) <= seen
    assert any(n.kind is NodeKind.BATCH for n in graph.nodes)
    for name in graph.inputs:
        assert graph.node(name).outputs[0].batch_dim == 0
    # Nothing fed by a user input is parameter-only, and nothing else is batch work.
    batchy = set(graph.inputs)
    for node in graph.nodes:
        if node.kind in (NodeKind.BATCH, NodeKind.PARAM_ONLY):
            fed = any(i in batchy for i in node.inputs)
            assert node.kind is (NodeKind.BATCH if fed else NodeKind.PARAM_ONLY), node.name
            if fed:
                batchy.add(node.name)


def test_param_only_nodes_are_marked(graphs):
    graph = graphs["param_derived"]
    consumers = graph.consumers()
    (sigmoid,) = [n for n in graph.nodes if n.params == ("gate_logits",)]
    (scaled,) = consumers[sigmoid.name]
    for name in (sigmoid.name, scaled):
        assert graph.node(name).kind is NodeKind.PARAM_ONLY
        assert graph.node(name).outputs == (TensorSpec((16,), "torch.float32", None),)
    layers = consumers[scaled]
    assert len(layers) == 3
    assert all(graph.node(name).kind is NodeKind.BATCH for name in layers)


def test_shapes_are_per_sample(graphs):
    graph = graphs["gpt2_tiny"]
    assert graph.node(graph.outputs[0]).outputs == (TensorSpec((1, 16, 128), "torch.float32", 0),)
    # A flattened (batch * seq, hidden) matmul input is (seq, hidden) per sample.
    addmm = next(n for n in graph.nodes if n.op == "aten.addmm.default")
    flat = graph.node(addmm.inputs[0]).outputs[0]
    assert flat == TensorSpec((16, 32), "torch.float32", 0)
    # Shape arithmetic on the batch is batch work; constant position tables are not.
    sizes = [n for n in graph.nodes if n.op == "aten.sym_size.int"]
    assert sizes and all(n.kind is NodeKind.BATCH for n in sizes)
    assert all(n.outputs == (TensorSpec((), "symint", None, (1.0, 0.0)),) for n in sizes)
    positions = next(n for n in graph.nodes if n.op == "aten.arange.default")
    assert positions.kind is NodeKind.PARAM_ONLY and positions.outputs[0].batch_dim is None


def test_module_paths_come_from_the_module_stack(graphs):
    graph = graphs["gpt2_tiny"]
    paths = {n.module_path for n in graph.nodes}
    assert {"transformer.h.0.attn", "transformer.h.1.mlp.c_fc", "lm_head"} <= paths
    head = graph.node(graph.outputs[0])
    assert head.module_path == "lm_head"


@pytest.mark.parametrize(
    ("written", "path"),
    [
        ("transformer.h.0.attn", "transformer.h.0.attn"),
        ("L['self'].transformer.h[0].attn", "transformer.h.0.attn"),
        ("getattr(L['self'].h, '0').self_attn", "h.0.self_attn"),
        ("self_attn.q_proj", "self_attn.q_proj"),
        ("L['self']", ""),
        ("", ""),
    ],
)
def test_module_paths_are_normalized(written, path):
    assert capture_common._normalize_path(written) == path


def test_inputs_map_to_call_positions_and_keywords(graphs):
    bert = graphs["bert_tiny"]
    assert bert.input_sources == {
        "input_ids": "args[0]",
        "attention_mask": "kwargs['attention_mask']",
    }
    assert bert.inputs == ["input_ids", "attention_mask"]
    masked = graphs["kwargs_mask"]
    assert list(masked.input_sources.values()) == ["args[0]", "kwargs['mask']"]
    loss = graphs["loss_inside"]
    assert list(loss.input_sources.values()) == ["args[0]", "args[1]"]
    assert loss.node(loss.outputs[0]).outputs == (TensorSpec((), "torch.float32", None),)


# --- parameters and fingerprints ---------------------------------------------------------------


def test_tied_parameters_are_one_spec(graphs):
    graph = graphs["tied"]
    assert "out.weight" not in graph.params
    assert graph.params["emb.weight"].aliases == ("out.weight",)
    readers = [n for n in graph.nodes if "emb.weight" in n.params]
    assert {n.module_path for n in readers} == {"emb", "out"}

    gpt = graphs["gpt2_tiny"]
    assert gpt.params["transformer.wte.weight"].aliases == ("lm_head.weight",)
    assert "lm_head.weight" not in gpt.params
    head = gpt.node(gpt.outputs[0])
    assert head.params == ("transformer.wte.weight",)
    model = gpt2_tiny()[0]
    assert gpt.param_bytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_buffers_are_recorded(graphs):
    graph = graphs["resnet_cnn"]
    mean = graph.params["stem.1.running_mean"]
    assert mean.is_buffer and not mean.requires_grad and mean.shape == (8,)
    assert graph.params["stem.1.weight"].requires_grad


def test_fingerprint_is_stable_and_structural():
    first = capture(*mlp(seed=0))
    again = capture(*mlp(seed=1))
    wider = capture(*mlp(width=48))
    assert len(first.fingerprint) == 64
    assert first.fingerprint == again.fingerprint
    assert first.fingerprint != wider.fingerprint
    assert capture(*tied()).fingerprint == capture(*tied()).fingerprint


# --- analytic stats -----------------------------------------------------------------------------


def test_linear_flops_per_sample():
    model = nn.Linear(24, 40)
    graph = capture(model, (torch.randn(1, 24),))
    (linear,) = [n for n in graph.nodes if n.op == "aten.linear.default"]
    assert linear.stats.flops_per_sample == 2 * 24 * 40
    assert linear.stats.flops_fixed == 0
    assert linear.stats.grad_inputs == 2  # weight and bias; the input needs no gradient


def test_matmul_nodes_have_stats(graphs):
    graph = graphs["gpt2_tiny"]
    heavy = [
        n
        for n in graph.nodes
        if n.op
        in (
            "aten.addmm.default",
            "aten.linear.default",
            "aten.scaled_dot_product_attention.default",
        )
    ]
    assert len(heavy) == 2 * 5 + 1
    for node in heavy:
        assert node.stats.flops_per_sample > 0
        assert node.stats.bytes_per_sample > 0
        assert node.stats.saved_per_sample > 0 or node.op == "aten.linear.default"
    # The head reuses the embedding's weight: 2 * seq * hidden * vocab per sample.
    assert graph.node(graph.outputs[0]).stats.flops_per_sample == 2 * 16 * 32 * 128


def test_mlp_saved_and_accessed_bytes_match_hand_calculation(graphs):
    graph = graphs["mlp"]
    linear0, relu0, linear1, relu1, linear2 = [n for n in graph.nodes if n.kind is NodeKind.BATCH]
    f32 = 4
    # Linear(16, 32) saves its input for the weight gradient; ReLU saves its output; the next
    # Linear saves that same output (counted once) and its weight (a parameter, never counted).
    assert linear0.stats.saved_per_sample == 16 * f32
    assert relu0.stats.saved_per_sample == 32 * f32
    assert linear1.stats.saved_per_sample == 0
    assert relu1.stats.saved_per_sample == 32 * f32
    assert linear2.stats.saved_per_sample == 0
    assert sum(n.stats.saved_fixed for n in graph.nodes) == 0
    assert linear0.stats.bytes_per_sample == (16 + 32) * f32
    assert linear0.stats.bytes_fixed == (32 * 16 + 32) * f32
    assert [n.stats.grad_inputs for n in (linear0, relu0, linear1)] == [2, 1, 3]


def test_param_derived_saved_bytes_are_fixed(graphs):
    graph = graphs["param_derived"]
    sigmoid = next(n for n in graph.nodes if n.op == "aten.sigmoid.default")
    assert sigmoid.stats.saved_fixed == 16 * 4 and sigmoid.stats.saved_per_sample == 0
    assert sigmoid.stats.flops_per_sample == 0


class _InPlaceAfterRepeat(nn.Module):
    """The last Linear repeats an earlier call, so capture replays it; then an in-place op,
    seen for the first time, must run on the replayed output."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).mul_(2.0)


@pytest.mark.parametrize(
    "example",
    [
        lambda: gpt2_tiny(n_layer=3),
        ZOO["resnet_cnn"],
        lambda: (_InPlaceAfterRepeat(), (torch.randn(1, 8),), {}),
    ],
    ids=["gpt2", "resnet", "in_place"],
)
def test_replaying_repeated_ops_matches_executing_each(example, monkeypatch):
    model, args, kwargs = example()
    replayed = capture(model, args, kwargs)
    monkeypatch.setattr(capture_meta_runner, "_replay_key", lambda *call: None)
    executed = capture(model, args, kwargs)
    assert [n.stats for n in replayed.nodes] == [n.stats for n in executed.nodes]
    assert [n.outputs for n in replayed.nodes] == [n.outputs for n in executed.nodes]


# --- meta device --------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def test_meta_model_captures_without_memory():
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(8192, 8192) for _ in range(16)])
    params = sum(p.numel() for p in model.parameters())
    assert params > 1e9
    capture(nn.Linear(2, 2), (torch.randn(1, 2),))  # pay for torch.export's imports first
    before = _rss_bytes()
    graph = capture(model, (torch.empty(1, 8192, device="meta"),))
    after = _rss_bytes()
    if before is not None and after is not None:
        assert after - before < 100 * 2**20  # the weights alone would be 4.3 GB
    assert graph.param_bytes == params * 4
    flops = sum(n.stats.flops_per_sample for n in graph.nodes)
    assert flops == 2 * 16 * 8192 * 8192
    assert all(p.device.type == "meta" for p in model.parameters())


# --- fallbacks and errors -----------------------------------------------------------------------


class _BatchSpecialized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h * (1.0 / len(h))  # len() needs a Python int: export specializes the batch


def test_batch_specializing_model_falls_back_to_static_capture(caplog):
    model = _BatchSpecialized()
    x = torch.randn(2, 8)
    graph = capture(model, (x,))
    assert graph.static_batch == 2
    assert "specializes the batch size" in caplog.text
    _assert_same(graph.fx_module(x), model(x))
    for node in graph.nodes:
        assert node.outputs == (TensorSpec((1, 8), "torch.float32", 0),)
    linear = next(n for n in graph.nodes if n.op == "aten.linear.default")
    assert linear.stats.flops_per_sample == 2 * 8 * 8


@torch.fx.wrap
def _normalize_by_peak(x: torch.Tensor) -> torch.Tensor:
    return x / max(float(x.detach().abs().max()), 1.0)  # reads a value, which export cannot trace


class _ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize_by_peak(self.fc(x))


def test_auto_falls_back_to_fx_when_export_fails():
    model = _ReadsValues()
    graph = capture(model, (torch.randn(1, 8),))
    assert graph.capture_method == "fx"
    assert [n.op for n in graph.nodes] == [
        "input",
        "module.torch.nn.modules.linear.Linear",
        f"{__name__}._normalize_by_peak",
        "output",
    ]
    fc = graph.node("fc")
    assert fc.params == ("fc.weight", "fc.bias") and fc.module_path == "fc"
    assert fc.stats.flops_per_sample == 2 * 8 * 8
    for batch in (3, 5):
        x = torch.randn(batch, 8)
        _assert_same(graph.fx_module(x), model(x))


def test_fx_method_captures_zoo_models():
    for name in ("mlp", "resnet_cnn", "skip", "param_derived"):
        model, args, kwargs = ZOO[name]()
        graph = capture(model, args, kwargs, method="fx")
        assert graph.capture_method == "fx"
        exported = capture(model, args, kwargs, method="export")
        flops = [sum(n.stats.flops_per_sample for n in g.nodes) for g in (graph, exported)]
        assert flops[0] == flops[1]
        batch_args, batch_kwargs = _at_batch(args, kwargs, 3)
        _assert_same(
            graph.fx_module(*batch_args, **batch_kwargs), model(*batch_args, **batch_kwargs)
        )


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


def test_capture_error_names_op_module_and_what_to_do(capsys):
    """On meta there are no values for a branch to follow (see the test below)."""
    with torch.device("meta"):
        model = _DataDependent()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(1, 8),))
    message = str(info.value)
    assert "`if x.sum() > 0:`" in message
    assert "module 'gate' (_Gate)" in message
    assert "torch.export:" in message and "torch.fx:" in message
    assert "autopart.Module(..., leaf_modules=['gate'])" in message
    assert "torch.fx.wrap" in message
    assert "Traceback" not in message
    assert info.value.__cause__ is not None
    assert "def forward" not in capsys.readouterr().err  # torch's partial graph is held back


class _MasksWhenAsked(nn.Module):
    """``if mask.any():``: a branch on an input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if mask.any():
            h = h.masked_fill(mask[:, None], 0.0)
        return h


def test_a_branch_on_values_is_captured_along_the_example_path_and_checked(caplog, capsys):
    model = _MasksWhenAsked()
    x = torch.randn(4, 8)
    mask = torch.tensor([True, False, False, True])
    graph = capture(model, (x, mask))
    assert "branches on tensor values" in caplog.text and "if mask.any():" in caplog.text
    assert "def forward" not in capsys.readouterr().err  # draft export's report is held back
    assert any(n.op.endswith("check_branch") for n in graph.nodes)
    assert graph.node(graph.inputs[0]).outputs[0].batch_dim == 0
    other = torch.tensor([False, True, True])
    _assert_same(graph.fx_module(x[:3], other), model(x[:3], other))
    with pytest.raises(BranchTaken, match=r"if mask.any\(\):.*torch.where"):
        graph.fx_module(x, torch.zeros(4, dtype=torch.bool))


class _BranchAtTheTop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y


def test_no_advice_to_make_the_whole_model_a_leaf():
    """A branch in the top-level forward: a leaf there would be the whole model, nothing to
    partition, so the advice does not offer it.  (On meta: no values to follow the branch.)"""
    with torch.device("meta"):
        model = _BranchAtTheTop()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(1, 8),))
    message = str(info.value)
    assert "the top-level forward (_BranchAtTheTop)" in message
    assert "leaf_modules" not in message
    assert "strict=" not in message  # not an option users have


def test_leaf_module_advice_works():
    model = _DataDependent()
    graph = capture(model, (torch.randn(1, 8),), leaf_modules=["gate"])
    assert graph.capture_method == "fx"
    assert graph.node("gate").module_path == "gate"
    x = torch.randn(3, 8)
    _assert_same(graph.fx_module(x), model(x))


def _wrapped_with_a_leaf(rank: int, world: int) -> None:
    import copy

    import autopart

    torch.manual_seed(0)
    model = _DataDependent()
    reference = copy.deepcopy(model)
    wrapped = autopart.Module(model, leaf_modules=["gate"])
    x = torch.randn(4, 8)
    out = wrapped(x)
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert torch.equal(out, reference(x))
    for name, param in reference.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name].grad, param.grad), name


@pytest.mark.multirank
def test_the_leaf_module_advice_can_be_followed_with_the_wrapper():
    from multirank import run_ranks

    run_ranks(1, _wrapped_with_a_leaf)


def test_bad_calls_are_capture_errors():
    with pytest.raises(CaptureError, match="method"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")
    with pytest.raises(CaptureError, match="batch"):
        capture(nn.Identity(), (3,))
    with pytest.raises(CaptureError, match=r"torch\.fx"):
        capture(_DataDependent(), (torch.randn(1, 8),), method="fx")


# --- scale --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.slow
def test_175b_gpt_captures_on_meta():
    """Structure only: the time is bench/plan_time.py's business, not a unit test's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=96, n_embd=12288, n_head=96, n_positions=2048, use_cache=False)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    graph = capture(model, (ids,))
    assert math.isclose(graph.param_bytes / 4, 174.6e9, rel_tol=0.01)
    blocks = {
        n.module_path.split(".")[2]
        for n in graph.nodes
        if n.module_path.startswith("transformer.h.")
    }
    assert len(blocks) == 96
    flops = sum(n.stats.flops_per_sample for n in graph.nodes)
    assert flops > 2 * 174e9 * 2048  # 2 * params * tokens, plus attention


class _NormThenBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(x))
        if (y >= 0).any():
            return ((h - 1) ** 2).mean()
        return h.sum() * 0


def test_capturing_a_branching_model_leaves_its_buffers_as_they_were():
    """Capture runs the captured path once on the example; a batch norm in training mode
    must not count that run (DDP's first step would see other statistics)."""
    model = _NormThenBranch().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, (torch.randn(6, 4), torch.ones(6)))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
