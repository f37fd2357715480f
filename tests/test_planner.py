"""The planner end to end on the capture zoo: structural invariants, options and errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from autopart.capture import capture
from autopart.cost import AnalyticCostModel, get_device_spec
from autopart.errors import AutopartError
from autopart.ir import Graph, NodeKind
from autopart.plan.plan import Plan, PlanError
from autopart.plan.planner import InfeasiblePlanError, PlanOptions, make_plan
from autopart.reports.plan_table import format_seconds, plan_table
from zoo import ZOO

ALL = sorted(ZOO)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graphs() -> dict[str, Graph]:
    return {name: capture(*ZOO[name]()) for name in ALL}


def _cost(memory: str | int | None = None) -> AnalyticCostModel:
    return AnalyticCostModel(get_device_spec("h100", memory_bytes=memory))


def assert_plan_invariants(graph: Graph, plan: Plan, devices: int) -> None:
    """Every batch op in exactly one stage, values flow forward only, ranks and memory add up."""
    stage_of: dict[str, int] = {}
    for stage in plan.stages:
        for name in stage.nodes:
            node = graph.node(name)
            if node.kind is NodeKind.PARAM_ONLY:
                continue
            assert node.kind is NodeKind.BATCH, f"{name} ({node.kind}) placed in a stage"
            assert name not in stage_of, f"{name} is in stages {stage_of[name]} and {stage.index}"
            stage_of[name] = stage.index
    batch_ops = {n.name for n in graph.nodes if n.kind is NodeKind.BATCH}
    assert set(stage_of) == batch_ops, f"unplaced ops: {sorted(batch_ops - set(stage_of))}"
    for stage in plan.stages:
        for name in stage.nodes:
            for src in graph.node(name).inputs:
                if src in stage_of:
                    assert stage_of[src] <= stage.index, f"{src} -> {name} flows backwards"
                elif graph.node(src).kind is NodeKind.PARAM_ONLY:
                    assert src in stage.nodes, f"param-only {src} missing from stage {stage.index}"
    ranks = sorted(r for s in plan.stages for r in s.ranks)
    assert ranks == list(range(devices))
    assert sum(s.replicas for s in plan.stages) == devices
    for stage in plan.stages:
        assert 0 < stage.memory_bytes <= plan.memory_capacity_bytes
        assert stage.forward_seconds > 0 and stage.backward_seconds > 0
    assert plan.step_seconds > 0
    plan.validate_for(graph, devices)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("stages", [None, 3])
def test_zoo_plans_satisfy_invariants(name, stages, graphs):
    graph = graphs[name]
    options = PlanOptions(devices=4, global_batch=8, stages=stages)
    plan = make_plan(graph, _cost(), options)
    assert_plan_invariants(graph, plan, devices=4)
    if stages is not None:
        assert plan.num_stages == stages


def test_skip_connection_crosses_stages(graphs):
    """The skip model's long residual must survive a cut between its ends."""
    graph = graphs["skip"]
    plan = make_plan(graph, _cost(), PlanOptions(devices=4, global_batch=4, stages=4))
    assert_plan_invariants(graph, plan, devices=4)
    stage_of = {n: s.index for s in plan.stages for n in s.nodes}
    spans = [
        stage_of[name] - stage_of[src]
        for s in plan.stages
        for name in s.nodes
        for src in graph.node(name).inputs
        if src in stage_of
    ]
    assert max(spans) >= 2, "expected a value that skips at least one stage"


def test_tight_memory_forces_more_stages_and_fits(graphs):
    graph = graphs["gpt2_tiny"]
    roomy = make_plan(graph, _cost("80GB"), PlanOptions(devices=4, global_batch=8))
    state = 4 * graph.param_bytes  # parameters, gradients and Adam's two moments
    tight_bytes = int(state / 1.5)
    tight = make_plan(graph, _cost(tight_bytes), PlanOptions(devices=4, global_batch=8))
    assert roomy.num_stages == 1
    assert tight.num_stages >= 2
    assert_plan_invariants(graph, tight, devices=4)
    assert max(s.memory_bytes for s in tight.stages) <= tight_bytes * 0.9


def test_optimizer_changes_the_memory_charged(graphs):
    graph = graphs["mlp"]
    peaks = {
        opt: make_plan(
            graph, _cost(), PlanOptions(devices=1, global_batch=4, optimizer=opt)
        ).stages[0]
        for opt in ("sgd", "sgd-momentum", "adam")
    }
    trainable = sum(p.nbytes for p in graph.params.values() if not p.is_buffer)
    assert peaks["sgd-momentum"].memory_bytes - peaks["sgd"].memory_bytes == trainable
    assert peaks["adam"].memory_bytes - peaks["sgd"].memory_bytes == 2 * trainable


def test_forced_microbatches_and_split_points(graphs):
    graph = graphs["mlp"]
    split = "2"  # the Sequential's second Linear
    plan = make_plan(
        graph,
        _cost(),
        PlanOptions(devices=2, global_batch=8, microbatches=4, split_points=(split,)),
    )
    assert plan.microbatches == 4
    assert plan.num_stages == 2
    assert any(p == split or p.startswith(split + ".") for p in plan.stages[1].module_paths)
    assert all(not (p == split or p.startswith(split + ".")) for p in plan.stages[0].module_paths)
    assert_plan_invariants(graph, plan, devices=2)


def test_unknown_split_point_is_a_clear_error(graphs):
    with pytest.raises(AutopartError, match="matches no module"):
        make_plan(
            graphs["mlp"], _cost(), PlanOptions(devices=2, global_batch=2, split_points=("nope",))
        )


def test_recompute_is_chosen_only_where_memory_requires_it(graphs):
    graph = graphs["gpt2_tiny"]
    roomy = make_plan(graph, _cost(), PlanOptions(devices=2, global_batch=64, microbatches=8))
    assert not any(s.recompute for s in roomy.stages)
    state = 4 * graph.param_bytes
    best = roomy.stages[0].memory_bytes
    # Room for the state plus a little activation memory: some stage must recompute.
    squeezed = None
    for fraction in (0.9, 0.8, 0.7, 0.6, 0.5):
        cap = int((state + (best - state) * fraction) / 0.9)
        try:
            plan = make_plan(
                graph, _cost(cap), PlanOptions(devices=2, global_batch=64, microbatches=8, stages=1)
            )
        except InfeasiblePlanError:
            break
        if any(s.recompute for s in plan.stages):
            squeezed = plan
            break
    assert squeezed is not None, "no memory cap between roomy and infeasible made a stage recompute"
    assert all(s.memory_bytes <= squeezed.memory_capacity_bytes for s in squeezed.stages)


def test_infeasible_plan_names_the_block_and_the_memory_needed(graphs):
    with pytest.raises(InfeasiblePlanError) as info:
        make_plan(graphs["gpt2_tiny"], _cost("64KB"), PlanOptions(devices=2, global_batch=2))
    message = str(info.value)
    assert "no partition of this model fits 2 device(s)" in message
    assert "Use devices with at least" in message
    assert "Block" in message


def test_infeasible_plan_suggests_a_device_count_that_fits(graphs):
    graph = graphs["gpt2_tiny"]
    cap = int(4 * graph.param_bytes / 3)
    with pytest.raises(InfeasiblePlanError) as info:
        make_plan(graph, _cost(cap), PlanOptions(devices=1, global_batch=2))
    message = str(info.value)
    suggested = int(message.split("so use about ")[1].split()[0])
    plan = make_plan(graph, _cost(cap), PlanOptions(devices=suggested, global_batch=2))
    assert_plan_invariants(graph, plan, devices=suggested)


def test_plan_records_fingerprint_and_rejects_other_models(graphs, tmp_path):
    plan = make_plan(graphs["mlp"], _cost(), PlanOptions(devices=2, global_batch=4))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    loaded.validate_for(graphs["mlp"], world_size=2)
    with pytest.raises(PlanError, match="different model"):
        loaded.validate_for(graphs["skip"])
    with pytest.raises(PlanError, match="2 devices but 3 ranks"):
        loaded.validate_for(graphs["mlp"], world_size=3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autopart", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def _cli_plan(tmp_path, *flags: str):
    """``autopart plan`` of the unbalanced example model on 4 devices, and the saved plan."""
    out = tmp_path / "plan.json"
    model = "examples/models.py:unbalanced"
    result = _cli("plan", model, "--devices", "4", *flags, "--json", str(out))
    assert result.returncode == 0, result.stderr
    return result, Plan.load(out)


def test_cli_plan_json_and_show(tmp_path):
    flags = ("--device-memory", "8GB", "--batch-size", "8", "--optimizer", "sgd")
    result, plan = _cli_plan(tmp_path, *flags)
    assert plan.devices == 4 and plan.global_batch_size == 8 and plan.optimizer == "sgd"
    assert "predicted step" in result.stdout
    shown = _cli("show", str(tmp_path / "plan.json"))
    assert shown.returncode == 0, shown.stderr
    assert "predicted step" in shown.stdout
    for stage in plan.stages:
        assert stage.module_paths[0] in shown.stdout


def test_cli_infeasible_plan_exits_1_with_one_message():
    result = _cli(
        "plan", "examples/models.py:unbalanced", "--devices", "2", "--device-memory", "1MB"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("autopart: error: no partition")


def test_cli_corrupt_plan_is_one_clear_error(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"version": 1, "stages": [')
    result = _cli("show", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "not valid JSON" in result.stderr


def test_zero_splits_optimizer_state_over_replicas(graphs):
    graph = graphs["mlp"]
    base = PlanOptions(devices=4, global_batch=8, stages=1, optimizer="adam")
    plain = make_plan(graph, _cost(), base).stages[0]
    zero = make_plan(graph, _cost(), PlanOptions(**{**base.__dict__, "zero": True})).stages[0]
    trainable = sum(p.nbytes for p in graph.params.values() if not p.is_buffer)
    assert plain.replicas == zero.replicas == 4
    assert plain.memory_bytes - zero.memory_bytes == pytest.approx(
        2 * trainable * (1 - 1 / 4), abs=1
    )


def test_analytic_costs_use_the_models_parameter_dtype():
    from autopart.cli.planning import cost_model_for
    from autopart.cost import compute_dtype

    model, args, kwargs = ZOO["mlp"]()
    model = model.to(torch.bfloat16)
    graph = capture(model, (args[0].to(torch.bfloat16),), kwargs)
    assert compute_dtype(graph) == "torch.bfloat16"
    assert cost_model_for(graph, "analytic", "h100", None).dtype == "bfloat16"


def _wide_then_narrow() -> Graph:
    """One huge layer followed by many small ones: only the huge one needs host memory."""
    layers = [torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 64)]
    for _ in range(6):
        layers += [torch.nn.Linear(64, 64), torch.nn.ReLU()]
    return capture(torch.nn.Sequential(*layers), (torch.randn(1, 2048),))


def test_auto_offload_turns_on_only_where_a_stage_does_not_fit():
    graph = _wide_then_narrow()
    cap = 60 * 2**20  # the huge layer with its gradient and Adam state is 64 MiB
    options = dict(devices=2, global_batch=8, stages=2, device_memory=cap)
    with pytest.raises(InfeasiblePlanError, match="offload"):
        make_plan(graph, _cost(), PlanOptions(**options))
    plan = make_plan(graph, _cost(), PlanOptions(**options, offload="auto"))
    assert_plan_invariants(graph, plan, 2)
    modes = [s.offload for s in plan.stages]
    huge = next(s for s in plan.stages if any(p.startswith("0.") for p in s.params))
    assert huge.offload in ("params", "params+optimizer"), modes
    assert "none" in modes, modes  # the small stage keeps its parameters on the device


def test_auto_offload_stays_off_when_everything_fits(graphs):
    plan = make_plan(graphs["mlp"], _cost(), PlanOptions(devices=2, global_batch=8, offload="auto"))
    assert all(s.offload == "none" for s in plan.stages)


def test_forced_offload_charges_the_working_set_and_the_host_link():
    graph = _wide_then_narrow()
    options = dict(devices=1, global_batch=8, microbatches=2)
    plain = make_plan(graph, _cost(), PlanOptions(**options))
    offloaded = make_plan(graph, _cost(), PlanOptions(**options, offload="params+optimizer"))
    stage, base = offloaded.stages[0], plain.stages[0]
    assert stage.offload == "params+optimizer"
    weights = sum(p.nbytes for p in graph.params.values())
    assert base.memory_bytes >= 4 * weights  # weights, gradients and two Adam moments
    # Offloaded: the huge layer's weight and bias with their gradients, and one weight ahead.
    group = 2048 * 2048 * 4 + 2048 * 4
    working = 2 * group + 2048 * 2048 * 4
    assert working <= stage.memory_bytes < working + 2**20, stage.memory_bytes
    # Every microbatch copies every weight in forward and backward (the gradients go back
    # beside them, the other way), and the host adds each microbatch's gradients to .grad.
    device = _cost().device
    link, host = device.host_link_bandwidth, device.host_memory_bandwidth
    floor = 2 * (max(2 * weights / link, weights / link) + 3 * weights / host)
    assert offloaded.step_seconds >= floor
    assert offloaded.step_seconds > plain.step_seconds


def test_offload_option_is_checked():
    with pytest.raises(AutopartError, match="unknown offload"):
        PlanOptions(devices=1, global_batch=1, offload="disk")


def test_auto_zero_splits_state_only_where_memory_requires_it():
    graph = _wide_then_narrow()
    options = dict(devices=4, global_batch=8, stages=1)
    # Parameters, gradients and Adam state: 64 MiB whole, 40 MiB split four ways (plus buckets).
    tight = dict(options, device_memory=66 * 2**20)
    with pytest.raises(InfeasiblePlanError):
        make_plan(graph, _cost(), PlanOptions(**tight, zero=False))
    plan = make_plan(graph, _cost(), PlanOptions(**tight))  # zero="auto" is the default
    assert [s.zero for s in plan.stages] == [True]
    assert plan.stages[0].offload == "none"
    roomy = make_plan(graph, _cost(), PlanOptions(**options, zero="auto"))
    assert [s.zero for s in roomy.stages] == [False]
    with pytest.raises(AutopartError, match="unknown zero"):
        PlanOptions(**options, zero="sometimes")


def test_cli_plan_with_offload_and_zero(tmp_path):
    result, plan = _cli_plan(tmp_path, "--stages", "2", "--offload", "params+optimizer", "--zero")
    assert [s.offload for s in plan.stages] == ["params+optimizer"] * 2
    assert all(s.zero for s in plan.stages)
    assert "params+optimizer" in result.stdout


def test_offloaded_state_must_fit_host_memory():
    graph = _wide_then_narrow()
    options = dict(devices=2, global_batch=8, stages=2, offload="params+optimizer")
    plan = make_plan(graph, _cost(), PlanOptions(**options))
    huge = next(s for s in plan.stages if any(p.startswith("0.") for p in s.params))
    weights = sum(graph.params[p].nbytes for p in huge.params)
    assert huge.host_bytes == 4 * weights  # parameters, gradients, two Adam moments
    with pytest.raises(InfeasiblePlanError, match="host memory of node 0"):
        make_plan(graph, _cost(), PlanOptions(**options, host_memory=3 * weights))
    kept = make_plan(graph, _cost(), PlanOptions(**options, host_memory=6 * weights))
    assert kept.stages[0].host_bytes > 0


def test_auto_schedule_picks_1f1b_where_gpipe_must_recompute():
    """The demo's GPT at hidden 128, sequence 64, in 2 stages of 4 microbatches on 40 MB
    devices (H100 spec, so the costs are fixed): GPipe holds all 4 microbatches and must
    recompute; 1F1B holds at most 2, fits without recomputing and is predicted faster, so
    "auto" takes it.  Each stage's recorded memory counts its own microbatches in flight."""
    from autopart.cli.demo import build_model
    from autopart.cli.planning import plan_model
    from autopart.config import Config
    from autopart.schedules import in_flight

    model, _ = build_model(4, 128, 64)
    ids = torch.randint(0, 256, (1, 64))
    plans = {}
    for schedule in ("gpipe", "auto"):
        config = Config(device_memory="40MB", schedule=schedule, stages=2, microbatches=4)
        options = PlanOptions.from_config(config, devices=2, global_batch=16, optimizer="adamw")
        _, plans[schedule] = plan_model(
            model, (ids,), {"labels": ids}, options=options, device_type="h100"
        )
    gpipe, auto = plans["gpipe"], plans["auto"]
    assert gpipe.schedule == "gpipe" and all(s.recompute for s in gpipe.stages)
    assert auto.schedule == "1f1b" and not any(s.recompute for s in auto.stages)
    assert auto.step_seconds < gpipe.step_seconds
    assert auto.schedule_note == ""
    assert in_flight("1f1b", 2, 4) == (2, 1)
    assert all(s.memory_bytes <= auto.memory_capacity_bytes for s in auto.stages)
    # Without labels the model computes no loss: "auto" stays on GPipe and says why.
    options = PlanOptions(devices=2, global_batch=16, optimizer="adamw", device_memory=40 * 10**6)
    _, unlabeled = plan_model(model, (ids,), {}, options=options, device_type="h100")
    assert unlabeled.schedule == "gpipe" and "no scalar loss" in unlabeled.schedule_note
    with pytest.raises(AutopartError, match="needs the model to compute its loss"):
        plan_model(
            model,
            (ids,),
            {},
            options=PlanOptions(devices=2, global_batch=16, schedule="1f1b"),
            device_type="h100",
        )


@pytest.mark.parametrize("optimizer,traffic", [("adam", 7.0), ("sgd", 3.0)])
def test_an_optimizer_step_in_host_memory_is_charged_at_its_bandwidth(optimizer, traffic):
    """Offloaded with its optimizer state, a stage's step ends with the optimizer's pass over
    that state in host memory (Adam: 28 bytes per parameter); on the device it is not
    charged (``offload="params"`` steps there)."""
    graph = _wide_then_narrow()
    options = dict(devices=1, global_batch=8, microbatches=2, optimizer=optimizer)
    on_host = make_plan(graph, _cost(), PlanOptions(**options, offload="params+optimizer"))
    on_device = make_plan(graph, _cost(), PlanOptions(**options, offload="params"))
    trainable = sum(p.nbytes for p in graph.params.values())
    expected = traffic * trainable / _cost().device.host_memory_bandwidth
    stage = on_host.stages[0]
    assert stage.host_step_seconds == pytest.approx(expected)
    assert on_device.stages[0].host_step_seconds == 0.0
    assert on_host.step_seconds == pytest.approx(on_device.step_seconds + expected)
    console = Console(record=True, width=200)
    console.print(plan_table(on_host))
    assert f"params+optimizer (step {format_seconds(expected)})" in console.export_text()


def test_offloaded_matmul_weights_cross_the_link_at_the_autocast_width():
    """Under bf16 an offloaded Linear's weight and bias go to the device as bf16 casts and
    their gradients come back as bf16 (the runtime's fetches); a LayerNorm's stay fp32."""
    from autopart.plan.planner import prepare

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    graph = capture(model, (torch.randn(2, 64),))
    linear = sum(p.numel() * 4 for p in model[0].parameters())
    norm = sum(p.numel() * 4 for p in model[1].parameters())
    for precision, expected in (("fp32", linear + norm), ("bf16", linear / 2 + norm)):
        options = PlanOptions(devices=1, global_batch=8, precision=precision, offload="params")
        _, blocks, coster = prepare(graph, _cost(), options)
        footprint = coster.footprint(0, len(blocks))
        assert footprint.link_bytes == expected, precision
        assert footprint.link_grad_bytes == expected, precision
