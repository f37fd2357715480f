import subprocess
import sys

import pytest

from autopart.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autopart", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("plan", "demo", "show"):
        assert name in result.stdout


@pytest.mark.parametrize("command", ["plan", "demo", "show"])
def test_each_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert f"autopart {command}" in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
