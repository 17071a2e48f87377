"""Where things are: the user cache, the offline data folder, and whether a name is a hub id rather than a
local path.

At the bottom of the package (it imports nothing of ours), so every stage can ask the same question the
same way.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models and cached scores live: $SELFDISTILL_CACHE, else the user cache."""
    root = os.environ.get("SELFDISTILL_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfdistill"
    return Path(root)


def default_data_dir(value: str = "") -> Path | None:
    """The offline data folder: `value`, else $SELFDISTILL_DATA_DIR, else ../shared/data when it exists."""
    if value:
        return Path(value).expanduser().resolve()
    if os.environ.get("SELFDISTILL_DATA_DIR"):
        return Path(os.environ["SELFDISTILL_DATA_DIR"]).expanduser().resolve()
    guess = Path.cwd().parent / "shared" / "data"
    return guess.resolve() if guess.is_dir() else None


def looks_like_hub_id(name: str | Path) -> bool:
    """`owner/name`: two non-empty parts and not written as a path (./, /, ~)."""
    name = str(name)
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def looks_like_hub_dataset(source: str | Path) -> bool:
    """A hub dataset id: a hub id without a file suffix, so a mistyped `data/train.jsonl` is reported as a
    missing file instead of being looked up on the hub."""
    return looks_like_hub_id(source) and Path(str(source)).suffix == ""
