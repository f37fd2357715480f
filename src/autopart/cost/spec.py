"""What the cost models need to know about one device and its links.

A `DeviceSpec` is plain data so a plan can be made for hardware that is not present (planning a
512-GPU job on a laptop) and so it can be written to a plan or a TOML/JSON file and read back.
Bandwidths are bytes per second *per device and per direction*, which is what the ring and
point-to-point formulas in `autopart.cost.comm` divide by.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from autopart.errors import AutopartError

#: The dtype names `DeviceSpec.peak_flops` is keyed by.
DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype: str) -> str:
    """``"torch.bfloat16"`` and ``"bfloat16"`` both name the same peak; keep the short form."""
    return dtype.removeprefix("torch.")


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or a CPU acting as one) and the links between devices.

    Attributes:
        name: a short identifier, e.g. ``"h100"``.
        memory_bytes: capacity the planner may fill on one device.
        peak_flops: dense matmul FLOP/s by dtype name (``"float32"``, ``"bfloat16"``, ...).
        memory_bandwidth: device memory bandwidth, B/s.
        intra_node_bandwidth: device-to-device bandwidth inside a node, B/s per direction.
        inter_node_bandwidth: bandwidth between nodes available to one device, B/s per direction.
        devices_per_node: devices that share the fast intra-node links.
        host_link_bandwidth: host memory to device bandwidth (PCIe), B/s, used for offload.
        kernel_latency_s: fixed cost of launching one op.
        link_latency_s: fixed cost of one message on a link.
        host_memory_bandwidth: host memory bandwidth one device's share of the host gets, B/s
            (one large copy's, read plus write): the speed of an optimizer step over
            offloaded parameters.
    """

    name: str
    memory_bytes: int
    peak_flops: dict[str, float] = field(hash=False)
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int
    host_link_bandwidth: float
    kernel_latency_s: float
    link_latency_s: float
    host_memory_bandwidth: float = 50e9

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; an error names the dtypes this spec knows."""
        try:
            return self.peak_flops[dtype_name(dtype)]
        except KeyError:
            known = ", ".join(sorted(self.peak_flops))
            raise AutopartError(
                f"device {self.name!r} has no peak FLOP/s for dtype {dtype!r} (it has: {known}); "
                "add it to the device spec's peak_flops"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the layout `autopart.cost.load_device_spec` reads back."""
        return asdict(self)
