"""Costs: how long ops take on a device, how long messages take between devices.

`DeviceSpec` describes a device and its links (built-ins, spec files, or measured here);
`AnalyticCostModel` and `MeasuredCostModel` both implement `CostModel`, the interface the planner
uses; `autopart.cost.comm` models stage-to-stage sends and gradient allreduce; and
`measure_links` replaces the link numbers of a spec with ones measured on a live process group.
"""

from autopart.cost.analytic import (
    AnalyticCostModel,
    BlockTimer,
    NodeArrays,
    analytic_cost_model,
    compute_dtype,
)
from autopart.cost.bandwidth import LinkMeasurement, measure_links
from autopart.cost.comm import (
    allreduce_seconds,
    allreduce_seconds_array,
    crosses_nodes,
    p2p_seconds,
    p2p_seconds_array,
)
from autopart.cost.devices import (
    BUILTIN_SPECS,
    device_spec_from_dict,
    get_device_spec,
    list_device_specs,
    load_device_spec,
    local_device_spec,
)
from autopart.cost.measured import MeasuredCostModel
from autopart.cost.model import CostModel
from autopart.cost.probe import cpu_spec
from autopart.cost.profiles import BlockProfile
from autopart.cost.spec import DeviceSpec
from autopart.cost.units import parse_bytes

__all__ = [
    "BUILTIN_SPECS",
    "AnalyticCostModel",
    "BlockProfile",
    "BlockTimer",
    "CostModel",
    "DeviceSpec",
    "LinkMeasurement",
    "MeasuredCostModel",
    "NodeArrays",
    "allreduce_seconds",
    "allreduce_seconds_array",
    "analytic_cost_model",
    "compute_dtype",
    "cpu_spec",
    "crosses_nodes",
    "device_spec_from_dict",
    "get_device_spec",
    "list_device_specs",
    "load_device_spec",
    "local_device_spec",
    "measure_links",
    "p2p_seconds",
    "p2p_seconds_array",
    "parse_bytes",
]
