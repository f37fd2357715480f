"""`bench/gpu_check.py` runs only where a GPU is lent, once; its dry run keeps it working here.

The dry run must reach every section, print the summary table last, skip only the rows that
measure CUDA memory, and pass: a FAIL row is a library bug the GPU run would report too.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("matrix", "exact", "measured", "peak", "overhead", "offload", "floors")
#: The rows a CPU cannot measure or run: CUDA memory, the cap, and a Mixtral traced on meta
#: (its router takes the branch for any device but the CPU: an int32 histc).
CUDA_ONLY = {
    "matrix mixtral m:meta x:cpu",
    "peak gpt2 4x256 pred/meas",
    "overhead 1 GPT-2 124M step",
    "overhead 2 GPT-2 124M peak",
    "overhead 3 predicted step",
    "overhead 4 predicted peak",
    "offload 1 plain under the cap",
    "offload 4 peak pred/meas",
    "offload 7 moved to GPU first",
    "floors 1 GPT-2 offload step",
    "floors 2 predicted step",
}
ROW = re.compile(r"^(?P<name>\S.*?)\s{2,}(?P<result>PASS|FAIL|SKIP)\s")


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/gpu_check.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def table(stdout: str) -> dict[str, str]:
    """Each row's result, from the summary table that ends the output."""
    assert "== summary:" in stdout, stdout[-3000:]
    rows = stdout.rsplit("== summary:", 1)[1].splitlines()[2:]
    parsed = [ROW.match(line) for line in rows]
    assert all(parsed), rows
    return {m["name"]: m["result"] for m in parsed}


@pytest.mark.slow
def test_the_dry_run_runs_every_section_and_passes():
    result = run_check("--cpu-dry-run")
    for section in SECTIONS:
        assert f"== {section} (" in result.stdout, result.stdout[-3000:]
    rows = table(result.stdout)
    assert {name.split()[0] for name in rows} == set(SECTIONS)
    assert len(rows) == 12 + 3 + 2 + 1 + 4 + 9 + 2, rows  # 6 families x cpu/meta, then the rest
    assert {name for name, r in rows.items() if r == "SKIP"} == CUDA_ONLY, rows
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
    assert not failed, "\n".join(failed)
    assert result.returncode == 0, result.stderr[-3000:]


def test_only_runs_the_sections_named():
    result = run_check("--cpu-dry-run", "--only", "peak,offload")
    assert {name.split()[0] for name in table(result.stdout)} == {"peak", "offload"}
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_without_a_gpu_it_refuses_to_run():
    assert run_check().returncode == 2
