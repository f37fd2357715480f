"""Atomic components: the units the planner never splits.

As in RaNNC, every op that touches batch data is its own component.  Ops computed only from
parameters or constants are not components: they are copied into every component that consumes
them (transitively), so no stage ever waits on another stage for a pure-parameter value.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopart.ir import Graph, NodeKind


@dataclass(frozen=True)
class Component:
    """A batch node plus the parameter-only nodes it needs, in graph order."""

    anchor: str
    nodes: tuple[str, ...]


def atomic_components(graph: Graph) -> list[Component]:
    """Return one component per batch node, in the graph's topological order."""
    by_name = {n.name: n for n in graph.nodes}

    closure = graph.param_only_closure()

    components = []
    for node in graph.nodes:
        if node.kind is not NodeKind.BATCH:
            continue
        needed: set[str] = set()
        for src in node.inputs:
            needed |= closure.get(src, frozenset())
        ordered = sorted(needed, key=graph.index)
        components.append(Component(anchor=node.name, nodes=(*ordered, node.name)))
    if not components:
        kinds = {n.kind.value for n in by_name.values()}
        raise ValueError(f"graph has no batch-carrying op to partition (node kinds: {kinds})")
    return components
