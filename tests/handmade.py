"""Build small IR graphs by hand, for planner tests that must not depend on capture."""

from __future__ import annotations

from autopart.ir import Graph, Node, NodeKind, NodeStats, ParamSpec, TensorSpec


def act(width: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec(shape=(width,), dtype="torch.float32", batch_dim=0),)


def graph(nodes: list[Node], params: dict[str, ParamSpec] | None = None) -> Graph:
    inputs = [n.name for n in nodes if n.kind is NodeKind.INPUT]
    outputs = [n.name for n in nodes if n.kind is NodeKind.OUTPUT]
    return Graph(
        nodes=nodes,
        params=params or {},
        inputs=inputs,
        outputs=outputs,
        fingerprint="handmade",
        capture_method="handmade",
    )


def linear_chain(widths: list[int], flops_scale: float = 1.0) -> Graph:
    """x -> linear_0 -> ... -> linear_{n-1} -> output, each with its own weight."""
    nodes = [Node("x", "input", NodeKind.INPUT, (), (), act(widths[0]), "")]
    params = {}
    prev = "x"
    for i in range(1, len(widths)):
        w = f"layers.{i - 1}.weight"
        params[w] = ParamSpec(w, (widths[i], widths[i - 1]), "torch.float32")
        name = f"linear_{i - 1}"
        stats = NodeStats(
            flops_per_sample=2.0 * widths[i] * widths[i - 1] * flops_scale,
            bytes_per_sample=4.0 * (widths[i] + widths[i - 1]),
            bytes_fixed=4.0 * widths[i] * widths[i - 1],
            saved_per_sample=4.0 * widths[i - 1],
            grad_inputs=2,
        )
        nodes.append(
            Node(
                name,
                "aten.linear.default",
                NodeKind.BATCH,
                (prev,),
                (w,),
                act(widths[i]),
                f"layers.{i - 1}",
                stats,
            )
        )
        prev = name
    nodes.append(Node("output", "output", NodeKind.OUTPUT, (prev,), (), (), ""))
    return graph(nodes, params)
