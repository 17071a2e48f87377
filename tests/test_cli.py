"""The CLI: every command answers --help from its config, and errors are one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfdistill.cli import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"selfdistill {command}" in capsys.readouterr().out


def test_unknown_flag_and_unknown_override_fail_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--no-such-flag", "1"])
    assert exit_info.value.code == 2
    assert main(["prune", "prune.nosuchkey=1"]) == 2
    assert "unknown config key 'prune'" in capsys.readouterr().err


def test_bad_input_in_a_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfdistill", "prune", "--model", str(tmp_path / "missing"),
                           "--layers", "0:1", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("selfdistill: error: model not found")
    assert "Traceback" not in proc.stderr
