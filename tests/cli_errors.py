"""The one-line-error check that every bad-input test makes through the CLI."""

from __future__ import annotations

from selfdistill.cli import main


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with one `selfdistill: error:` line and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("selfdistill: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
