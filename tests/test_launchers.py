"""An unmodified training script plus one line, under the real torchrun launcher."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multirank
def test_example_script_trains_under_torchrun():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            str(ROOT / "examples" / "train.py"),
            "--steps",
            "15",
            "--stages",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+) plan 2 stage", result.stdout)]
    assert len(losses) == 2, result.stdout
    assert losses[1] < losses[0] * 0.8, f"loss did not fall: {losses}"
