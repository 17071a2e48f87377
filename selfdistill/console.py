"""What `selfdistill` shows on the terminal, and where everything else goes.

The terminal gets our own progress: a line when a stage starts and when it ends (with its time), our
warnings and errors, and the progress bars of our own long loops (`progress`). What the libraries say —
Python `logging` from transformers, datasets, lm-eval, accelerate and huggingface_hub, Python warnings,
their progress bars — goes to the run log, appended with timestamps. `--verbose` keeps everything on
the terminal too. Errors stay one line on stderr (cli.py).

The run log lives in what the command owns: `RUN_DIR/run.log` for `selfdistill run`, `OUT/run.log` inside
a stage's output folder, `OUT.log` beside a stage's output file (a stage that writes no --out keeps none).
It starts only once the stage has claimed its output (selfdistill/guard.py), is appended to only when it is
one of ours, and is taken back when the command then fails on bad input before writing its output.

The libraries are quietened with their own switches (environment variables read when they are imported,
and their `disable_progress_bar` calls), never by redirecting file descriptors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

OURS = "selfdistill"
CONSOLE = logging.getLogger(f"{OURS}.console")  # the stage lines: on the terminal even when quiet
LOG_NAME = "run.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OUR_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")  # a line of _FORMAT
log = logging.getLogger(f"{OURS}.log")

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


def is_our_log(path: Path) -> bool:
    """A run log this package wrote: its first line is one of our records (a user's own run.log is left alone)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _OUR_LINE.match(f.readline()) is not None
    except OSError:
        return False


def output_log_path(output: Path, folder: bool) -> Path:
    """Where a stage's log goes: `run.log` inside its output folder, `NAME.log` beside its output file NAME."""
    return output / LOG_NAME if folder else output.with_name(output.name + ".log")


def _state(output: Path, log_file: Path) -> frozenset[tuple[str, int, int]] | None:
    """What `output` holds (every file and folder but the log, with size and mtime), to tell afterwards
    whether the command wrote any of it; None: it does not exist."""
    if not output.exists():
        return None
    entries = output.rglob("*") if output.is_dir() else ()
    with contextlib.suppress(OSError):
        return frozenset((str(p), (st := p.lstat()).st_size, st.st_mtime_ns)
                         for p in (output, *entries) if p != log_file)
    return frozenset()


class RunLog(logging.Handler):
    """Appends every record to a run log once `open` names it; keeps them until then, so nothing is written
    before the command's output is claimed (a refused command leaves nothing), and `discard` takes the log
    back when the command then fails on bad input before writing its output."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.pending: list[logging.LogRecord] | None = []  # None: no log for this command
        self.file: TextIO | None = None
        self.path: Path | None = None
        self._undo: tuple[Path, Any, int | None, list[Path]] | None = None  # output, its state, log size, folders made

    def open(self, path: Path | None, output: Path | None = None) -> None:
        """Write to the log file `path` from now on, the records so far first; None: keep no log. `output`:
        what the log belongs to (default: its folder), which `discard` checks."""
        if path is not None and self.path == path:
            return
        self.close_file()
        pending, self.pending = self.pending or [], None
        if path is None:
            return
        if path.exists() and not is_our_log(path):
            log.warning("%s was not written by selfdistill: left as it is, and this command keeps no log", path)
            return
        made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        output = output or path.parent
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            size = path.stat().st_size if path.exists() else None
            self.file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close_file
        except OSError:
            return  # an unwritable folder: the stage reports it itself, in one line
        self.path, self._undo = path, (output, _state(output, path), size, made)
        self.emit(logging.LogRecord(OURS, logging.INFO, __file__, 0, "command: %s", (" ".join(sys.argv),), None))
        for record in pending:
            self.emit(record)

    def discard(self) -> None:
        """After bad input: remove the log this command created (or cut its lines from our earlier one), and
        the folders made for it, unless the command changed its output after the log opened."""
        if self.path is None or self._undo is None:
            return
        path, (output, state, size, made) = self.path, self._undo
        self.close_file()
        if _state(output, path) != state:  # the command wrote (part of) its output: the log explains it
            return
        with contextlib.suppress(OSError):
            if size is None:
                path.unlink()
            else:
                os.truncate(path, size)
        for folder in made:  # deepest first; one the stage also wrote into is not empty and stays
            with contextlib.suppress(OSError):
                folder.rmdir()

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.write(self.format(record) + "\n")
        elif self.pending is not None:
            self.pending.append(record)

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.path = self._undo = None

    def close(self) -> None:
        self.close_file()
        super().close()


_run_log: RunLog | None = None


def open_run_log(folder: str | Path | None) -> None:
    """Start writing the run log `folder`/run.log (a run directory the run owns), or keep none (None); a no-op
    outside the CLI, which owns the process's logging."""
    if _run_log is not None:
        _run_log.open(Path(folder) / LOG_NAME if folder else None, Path(folder) if folder else None)


def open_output_log(output: Path, folder: bool) -> None:
    """Called once a stage has claimed `output`: the command's log starts there, unless one is open already
    (the run directory's, or the first output's of a stage that claims two)."""
    if _run_log is not None and _run_log.pending is not None:
        _run_log.open(output_log_path(output, folder), output)


def discard_run_log() -> None:
    """The command ended on bad input: see `RunLog.discard`."""
    if _run_log is not None:
        _run_log.discard()


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
