"""The one interface the planner costs through, whatever the source of the numbers.

Analytic costs (`autopart.cost.analytic`) are instant and work for hardware that is not present;
measured costs (`autopart.cost.measured`) run the ops on the local device.  The planner only asks
how long a set of nodes takes at a batch size, so either can be swapped in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from autopart.cost.spec import DeviceSpec
from autopart.ir import Node


class CostModel(Protocol):
    """Forward and backward seconds of a set of nodes on one device.

    ``source`` names the kind of costs (``"analytic"`` or ``"measured"``) for `Plan.cost_source`.
    """

    device: DeviceSpec
    source: str

    def block_seconds(self, nodes: Sequence[Node], batch: int) -> tuple[float, float]:
        """``(forward, backward)`` seconds of running ``nodes`` on ``batch`` samples.

        Backward excludes recomputation: a caller that recomputes adds the forward again.
        """
        ...
