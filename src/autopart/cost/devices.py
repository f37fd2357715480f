"""Built-in device specs, spec files, and lookup by name.

Built-in numbers are the vendors' public datasheet figures for the SXM parts (dense, no
sparsity), so a plan for hardware that is not present predicts what the hardware can do at best.
Two choices matter:

* ``float32`` peaks are the *non-tensor-core* FP32 rates (67 TFLOP/s on H100, not the 495 of
  TF32).  PyTorch runs float32 matmuls in full FP32 unless the user opts into TF32
  (``torch.backends.cuda.matmul.allow_tf32``, off by default), so the FP32 rate is what a
  float32 model gets; a user who enables TF32 can supply a spec file with the higher number.
* Memory is the marketed capacity in decimal bytes (``"80GB"`` = 80e9), some 6% below what the
  card reports (about 85e9 on an H100), which leaves room for the CUDA context and allocator
  fragmentation.

``cpu`` is not a table entry: it is measured on this machine (`autopart.cost.probe`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from autopart.cost.probe import cpu_spec, measure_matmul_flops, measure_memory_bandwidth
from autopart.cost.spec import DeviceSpec
from autopart.cost.units import parse_bytes
from autopart.errors import AutopartError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - only on Python 3.10
    tomllib = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_GPU_LAUNCH_S = 5e-6  # eager PyTorch op dispatch + kernel launch on a modern GPU
_NCCL_LATENCY_S = 10e-6  # one small NCCL message


def _gpu(name: str, memory: str, fp32: float, half: float, bf16: float, **links: Any) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        memory_bytes=parse_bytes(memory),
        peak_flops={"float32": fp32, "bfloat16": bf16, "float16": half},
        devices_per_node=8,
        kernel_latency_s=_GPU_LAUNCH_S,
        link_latency_s=_NCCL_LATENCY_S,
        **links,
    )


# NVLink figures are per direction (half the marketed bidirectional total); inter-node is one
# NIC per GPU: 400 Gb/s NDR (H100/H200), 200 Gb/s HDR (A100), 100 Gb/s EDR (V100).
_HOPPER_LINKS = {
    "intra_node_bandwidth": 450e9,  # NVLink 4: 900 GB/s bidirectional
    "inter_node_bandwidth": 50e9,
    "host_link_bandwidth": 55e9,  # PCIe 5 x16, achievable
}
_AMPERE_LINKS = {
    "intra_node_bandwidth": 300e9,  # NVLink 3: 600 GB/s bidirectional
    "inter_node_bandwidth": 25e9,
    "host_link_bandwidth": 25e9,  # PCIe 4 x16, achievable
}

BUILTIN_SPECS: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        _gpu(
            "h100", "80GB", 66.9e12, 989.4e12, 989.4e12, memory_bandwidth=3.35e12, **_HOPPER_LINKS
        ),
        _gpu(
            "h200", "141GB", 66.9e12, 989.4e12, 989.4e12, memory_bandwidth=4.8e12, **_HOPPER_LINKS
        ),
        _gpu(
            "a100-40gb", "40GB", 19.5e12, 312e12, 312e12, memory_bandwidth=1.555e12, **_AMPERE_LINKS
        ),
        _gpu(
            "a100-80gb", "80GB", 19.5e12, 312e12, 312e12, memory_bandwidth=2.039e12, **_AMPERE_LINKS
        ),
        # V100 has no bfloat16 hardware: PyTorch runs bf16 matmuls at about the FP32 rate.
        _gpu(
            "v100",
            "32GB",
            15.7e12,
            125e12,
            15.7e12,
            memory_bandwidth=0.9e12,
            intra_node_bandwidth=150e9,  # NVLink 2: 300 GB/s bidirectional
            inter_node_bandwidth=12.5e9,
            host_link_bandwidth=12e9,  # PCIe 3 x16, achievable
        ),
    )
}

_REQUIRED = (
    "name",
    "memory_bytes",
    "peak_flops",
    "memory_bandwidth",
    "intra_node_bandwidth",
    "inter_node_bandwidth",
    "devices_per_node",
    "host_link_bandwidth",
)
_DEFAULTS = {"kernel_latency_s": _GPU_LAUNCH_S, "link_latency_s": _NCCL_LATENCY_S}


def list_device_specs() -> list[str]:
    """Names `get_device_spec` accepts besides file paths: the built-ins and ``cpu``."""
    return [*sorted(BUILTIN_SPECS), "cpu"]


def get_device_spec(name_or_path: str | Path, memory_bytes: int | str | None = None) -> DeviceSpec:
    """A built-in spec by name (case-insensitive), ``cpu`` (measured here), or a spec file.

    ``memory_bytes`` overrides the capacity, e.g. to plan for less memory than the device has.
    """
    key = str(name_or_path).strip().lower()
    if key in BUILTIN_SPECS:
        spec = BUILTIN_SPECS[key]
    elif key == "cpu":
        spec = cpu_spec()
    elif Path(name_or_path).is_file():
        spec = load_device_spec(name_or_path)
    else:
        raise AutopartError(
            f"unknown device {str(name_or_path)!r}: use one of {', '.join(list_device_specs())} "
            "or the path of a TOML/JSON device spec file"
        )
    if memory_bytes is not None:
        spec = dataclasses.replace(spec, memory_bytes=parse_bytes(memory_bytes))
    return spec


def local_device_spec(device: torch.device) -> DeviceSpec:
    """The spec of a device this process can use, e.g. for measured costs.

    A CUDA device whose name matches a built-in gets that spec with its real capacity; PCIe cards
    (clocked below the SXM datasheet numbers) and unknown GPUs are measured like the CPU, with
    PCIe-class placeholder links.
    """
    if device.type == "cpu":
        return cpu_spec()
    if device.type != "cuda":
        raise AutopartError(f"no device spec for {device}: only cpu and cuda devices are known")
    props = torch.cuda.get_device_properties(device)
    name = props.name.upper()
    if "PCIE" not in name:
        for marker, key in (
            ("H200", "h200"),
            ("H100", "h100"),
            ("A100", "a100-80gb" if props.total_memory > 50e9 else "a100-40gb"),
            ("V100", "v100"),
        ):
            if marker in name:
                return dataclasses.replace(BUILTIN_SPECS[key], memory_bytes=props.total_memory)
    log.info("%s has no built-in spec; measuring it", props.name)
    fp32 = measure_matmul_flops(device, torch.float32)
    bf16 = measure_matmul_flops(device, torch.bfloat16) if torch.cuda.is_bf16_supported() else fp32
    return DeviceSpec(
        name=props.name,
        memory_bytes=props.total_memory,
        peak_flops={
            "float32": fp32,
            "bfloat16": bf16,
            "float16": measure_matmul_flops(device, torch.float16),
        },
        memory_bandwidth=measure_memory_bandwidth(device),
        intra_node_bandwidth=25e9,  # PCIe 4 peer-to-peer
        inter_node_bandwidth=12.5e9,  # 100 Gb/s
        devices_per_node=torch.cuda.device_count(),
        host_link_bandwidth=25e9,
        kernel_latency_s=_GPU_LAUNCH_S,
        link_latency_s=_NCCL_LATENCY_S,
    )


def load_device_spec(path: str | Path) -> DeviceSpec:
    """Read a spec from a ``.toml`` or ``.json`` file with the fields of `DeviceSpec`.

    ``memory_bytes`` may be a string such as ``"80GB"``; ``kernel_latency_s`` and
    ``link_latency_s`` may be left out (GPU-typical defaults).  `DeviceSpec.to_dict` of a
    built-in is a template.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise AutopartError(f"cannot read device spec {path}: {err.strerror}") from err
    if path.suffix.lower() == ".toml":
        if tomllib is None:
            raise AutopartError("TOML device specs need Python 3.11+; write the spec as JSON")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise AutopartError(f"device spec {path} is not valid TOML: {err}") from err
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise AutopartError(f"device spec {path} is not valid JSON: {err}") from err
    else:
        raise AutopartError(f"device spec {path} must end in .toml or .json")
    return device_spec_from_dict(data, source=str(path))


def device_spec_from_dict(data: Any, source: str = "device spec") -> DeviceSpec:
    """Validate plain data (as `DeviceSpec.to_dict` writes it) into a spec."""
    if not isinstance(data, dict):
        raise AutopartError(f"{source}: a device spec must be a table/object of fields")
    fields = {f.name for f in dataclasses.fields(DeviceSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise AutopartError(f"{source}: unknown field(s) {', '.join(unknown)}")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise AutopartError(f"{source}: missing field(s) {', '.join(missing)}")
    values = {**_DEFAULTS, **data}

    if not isinstance(values["name"], str) or not values["name"]:
        raise AutopartError(f"{source}: field 'name' must be a non-empty string")
    try:
        values["memory_bytes"] = parse_bytes(values["memory_bytes"])
    except AutopartError as err:
        raise AutopartError(f"{source}: field 'memory_bytes': {err}") from None
    peaks = values["peak_flops"]
    if not isinstance(peaks, dict) or "float32" not in peaks:
        raise AutopartError(
            f"{source}: field 'peak_flops' must map dtype names to FLOP/s and include 'float32'"
        )
    values["peak_flops"] = {
        str(dtype): _positive(source, f"peak_flops.{dtype}", flops)
        for dtype, flops in peaks.items()
    }
    for name in (
        "memory_bandwidth",
        "intra_node_bandwidth",
        "inter_node_bandwidth",
        "host_link_bandwidth",
    ):
        values[name] = _positive(source, name, values[name])
    for name in ("kernel_latency_s", "link_latency_s"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise AutopartError(f"{source}: field {name!r} must be a number >= 0, not {value!r}")
        values[name] = float(value)
    per_node = values["devices_per_node"]
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
        raise AutopartError(
            f"{source}: field 'devices_per_node' must be an integer >= 1, not {per_node!r}"
        )
    return DeviceSpec(**values)


def _positive(source: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AutopartError(f"{source}: field {name!r} must be a number > 0, not {value!r}")
    return float(value)
