import dataclasses
import json

import pytest

from autopart.cost import (
    BUILTIN_SPECS,
    cpu_spec,
    get_device_spec,
    list_device_specs,
    load_device_spec,
    parse_bytes,
)
from autopart.errors import AutopartError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GB", 80 * 10**9),
        ("40GiB", 40 * 2**30),
        ("512MB", 512 * 10**6),
        ("512 MiB", 512 * 2**20),
        ("1.5TB", 1_500_000_000_000),
        ("2e3KB", 2_000_000),
        ("100", 100),
        ("100b", 100),
        (4096, 4096),
        ("80gb", 80 * 10**9),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GB", "80G", "eighty GB", "80 GBs", "-5GB", -1, 1.5, True, None]
)
def test_parse_bytes_rejects_garbage(bad):
    with pytest.raises(AutopartError):
        parse_bytes(bad)


def test_parse_bytes_error_suggests_units():
    with pytest.raises(AutopartError, match="GiB"):
        parse_bytes("80G")


@pytest.mark.parametrize(
    ("name", "memory"),
    [
        ("h100", 80e9),
        ("h200", 141e9),
        ("a100-40gb", 40e9),
        ("a100-80gb", 80e9),
        ("v100", 32e9),
    ],
)
def test_builtin_specs(name, memory):
    spec = get_device_spec(name)
    assert spec.memory_bytes == memory
    assert name in list_device_specs()
    # Tensor-core half precision is far faster than plain FP32 on every built-in but bf16 on V100.
    assert spec.peak("float16") > 5 * spec.peak("float32")
    assert spec.peak("torch.float32") == spec.peak_flops["float32"]
    assert spec.inter_node_bandwidth < spec.intra_node_bandwidth
    assert spec.devices_per_node == 8


def test_h100_numbers():
    spec = BUILTIN_SPECS["h100"]
    assert spec.peak("bfloat16") == pytest.approx(989e12, rel=0.01)
    assert spec.peak("float32") == pytest.approx(67e12, rel=0.01)
    assert spec.memory_bandwidth == pytest.approx(3.35e12)
    assert spec.intra_node_bandwidth == pytest.approx(450e9)
    assert BUILTIN_SPECS["h200"].memory_bandwidth > spec.memory_bandwidth


def test_lookup_is_case_insensitive_and_memory_can_be_overridden():
    spec = get_device_spec("H100", memory_bytes="40GiB")
    assert spec.name == "h100"
    assert spec.memory_bytes == 40 * 2**30
    assert BUILTIN_SPECS["h100"].memory_bytes == 80e9


def test_unknown_device_names_the_choices():
    with pytest.raises(AutopartError, match="h100"):
        get_device_spec("tpu-v9")


def test_missing_peak_dtype_is_a_clear_error():
    with pytest.raises(AutopartError, match="float8"):
        BUILTIN_SPECS["h100"].peak("float8")


def _write_toml(path, spec):
    lines = []
    for key, value in spec.to_dict().items():
        if key != "peak_flops":
            lines.append(f"{key} = {json.dumps(value)}")
    lines.append("[peak_flops]")
    lines += [f"{dtype} = {flops!r}" for dtype, flops in spec.peak_flops.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_spec_file_round_trip(tmp_path, suffix):
    original = dataclasses.replace(BUILTIN_SPECS["a100-80gb"], name="my-a100")
    path = tmp_path / f"gpu.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(original.to_dict()))
    else:
        _write_toml(path, original)
    assert load_device_spec(path) == original
    assert get_device_spec(str(path), memory_bytes=1000).memory_bytes == 1000


def test_spec_file_accepts_memory_string_and_default_latencies(tmp_path):
    data = BUILTIN_SPECS["h100"].to_dict()
    data["memory_bytes"] = "24GiB"
    del data["kernel_latency_s"], data["link_latency_s"]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    spec = load_device_spec(path)
    assert spec.memory_bytes == 24 * 2**30
    assert spec.kernel_latency_s > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_bandwidth": None}, "missing field.*memory_bandwidth"),
        ({"devices_per_node": 0}, "devices_per_node"),
        ({"intra_node_bandwidth": -1}, "intra_node_bandwidth"),
        ({"memory_bytes": "lots"}, "memory_bytes"),
        ({"peak_flops": {"bfloat16": 1e12}}, "float32"),
        ({"peak_flops": {"float32": "fast"}}, r"peak_flops\.float32"),
        ({"colour": "green"}, "unknown field.*colour"),
    ],
)
def test_spec_file_errors_name_the_field(tmp_path, change, message):
    data = BUILTIN_SPECS["h100"].to_dict()
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AutopartError, match=message):
        load_device_spec(path)


def test_spec_file_syntax_errors(tmp_path):
    bad_toml = tmp_path / "gpu.toml"
    bad_toml.write_text("name = \n")
    with pytest.raises(AutopartError, match="TOML"):
        load_device_spec(bad_toml)
    bad_json = tmp_path / "gpu.json"
    bad_json.write_text("{")
    with pytest.raises(AutopartError, match="JSON"):
        load_device_spec(bad_json)
    with pytest.raises(AutopartError, match="cannot read"):
        load_device_spec(tmp_path / "absent.json")
    other = tmp_path / "gpu.yaml"
    other.write_text("name: x")
    with pytest.raises(AutopartError, match=r"\.toml or \.json"):
        load_device_spec(other)


def test_cpu_spec_is_measured_and_plausible():
    spec = get_device_spec("cpu")
    assert spec is cpu_spec()  # measured once per process
    assert spec.peak("float32") > 1e9
    assert spec.memory_bandwidth > 1e8
    assert spec.memory_bytes > 2**28
    assert spec.devices_per_node >= 1


def test_host_link_of_the_cpu_is_a_copy_bandwidth():
    import torch

    from autopart.cost.probe import measure_host_link, measure_memory_bandwidth

    link = measure_host_link(torch.device("cpu"))
    # A copy moves each byte once; the memory bandwidth counts the read and the write.
    assert 0.1 * measure_memory_bandwidth(torch.device("cpu")) / 2 < link < 1e13
