"""What `selfdistill` shows on the terminal, and where everything else goes.

The terminal gets our own progress: a line when a stage starts and when it ends (with its time), our
warnings and errors, and the progress bars of our own long loops (`progress`). What the libraries say —
Python `logging` from transformers, datasets, lm-eval, accelerate and huggingface_hub, Python warnings,
their progress bars — goes to the run log, `run.log`, appended with timestamps. `--verbose` keeps
everything on the terminal too. Errors stay one line on stderr (cli.py).

The libraries are quietened with their own switches (environment variables read when they are imported,
and their `disable_progress_bar` calls), never by redirecting file descriptors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

OURS = "selfdistill"
CONSOLE = logging.getLogger(f"{OURS}.console")  # the stage lines: on the terminal even when quiet
LOG_NAME = "run.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Read by the libraries when they are imported (tqdm reads TQDM_* then), so they are set before any stage
# module loads. TQDM_DISABLE changes tqdm's default only: `progress` passes `disable` and keeps our bars.
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# Chatty at INFO (a line per HTTP request or file lock): kept out of the run log below WARNING.
_CHATTY = ("httpx", "urllib3", "filelock", "fsspec", "huggingface_hub")


def duration(seconds: float) -> str:
    """`24 s`, `3 min 12 s`, `2 h 05 min`."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def say(message: str, *args: Any) -> None:
    """One line of our own progress on the terminal (and in the run log)."""
    CONSOLE.info(message, *args)


def library_bars_hidden() -> bool:
    """True under the quiet terminal: for a library bar that passes `disable=` itself (TQDM_DISABLE cannot)."""
    return os.environ.get("TQDM_DISABLE") == "1"


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar for one of our own long loops: shown on the terminal even when library bars are off."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", False)  # explicit, so TQDM_DISABLE (meant for the libraries) leaves it on
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


class _Terminal(logging.Filter):
    """Quiet: our stage lines and our warnings. Verbose: every record."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.name == CONSOLE.name:
            return True
        return record.name.split(".")[0] == OURS and record.levelno >= logging.WARNING


class RunLog(logging.Handler):
    """Appends every record to `<folder>/run.log` once `open` names the folder; keeps them until then, so a
    run directory is not created before the run is allowed to start (a refused run leaves nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.pending: list[logging.LogRecord] | None = []  # None: no log for this command
        self.file: TextIO | None = None
        self.path: Path | None = None

    def open(self, folder: str | Path | None) -> None:
        """Write to `folder`/run.log from now on, the records so far first; None: keep no log."""
        path = Path(folder) / LOG_NAME if folder else None
        if path is not None and self.path == path:
            return
        self.close_file()
        pending, self.pending = self.pending or [], None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close_file
        except OSError:
            return  # an unwritable folder: the stage reports it itself, in one line
        self.path = path
        for record in pending:
            self.emit(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.write(self.format(record) + "\n")
        elif self.pending is not None:
            self.pending.append(record)

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.path = None

    def close(self) -> None:
        self.close_file()
        super().close()


_run_log: RunLog | None = None


def open_run_log(folder: str | Path | None) -> None:
    """Start writing the run log in `folder`, or keep none (None); a no-op outside the CLI, which owns the
    process's logging."""
    if _run_log is not None:
        _run_log.open(folder)


def run_log_path() -> Path | None:
    return _run_log.path if _run_log is not None else None


def _route_libraries(verbose: bool) -> None:
    """Library records propagate to our handlers instead of printing through their own."""
    import transformers.utils.logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not verbose:
        hf_logging.disable_progress_bar()  # the env switch is read once, at import: also off when imported already
        with contextlib.suppress(ImportError):
            import datasets

            datasets.disable_progress_bars()
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def _unroute_libraries() -> None:
    """transformers prints through its own handler again. Its bars stay as they are: turning them back on
    while HF_HUB_DISABLE_PROGRESS_BARS was set at import only earns a warning."""
    import transformers.utils.logging as hf_logging

    hf_logging.disable_propagation()
    hf_logging.enable_default_handler()


@contextlib.contextmanager
def terminal(verbose: bool = False, stream: TextIO | None = None) -> Iterator[None]:
    """The CLI's logging for one command: stage lines (and, verbose, everything) to `stream`, all of it to the
    run log. Restores the process's logging and environment afterwards (tests call the CLI in-process)."""
    global _run_log
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {k: os.environ.get(k) for k in QUIET_ENV})
    if not verbose:
        os.environ.update(QUIET_ENV)
    shown = logging.StreamHandler(stream or sys.stderr)
    shown.setFormatter(logging.Formatter("%(message)s"))
    shown.addFilter(_Terminal(verbose))
    _run_log = RunLog()
    root.setLevel(logging.INFO)
    for handler in (shown, _run_log):
        root.addHandler(handler)
    logging.captureWarnings(True)  # warnings become records of the `py.warnings` logger: the run log's
    try:
        _route_libraries(verbose)
        yield
    finally:
        logging.captureWarnings(False)
        _unroute_libraries()
        for handler in (shown, _run_log):
            root.removeHandler(handler)
            handler.close()
        _run_log = None
        root.setLevel(saved[0])
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
