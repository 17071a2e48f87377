"""An output apart from its inputs: no stage writes where it reads.

`claim_output` (guard.py) keeps a stage off another's output; this keeps it off its own inputs, which may well
be a folder the same stage wrote (`prune --model child --out child` would replace the model it is reading).
The stage table names each stage's inputs (stages.py); `selfdistill run` checks its run directory the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError


def _local_paths(value: Any) -> list[str]:
    """The strings of a config value that name existing local paths (a hub id or an alias names none)."""
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in items if v and isinstance(v, (str, Path)) and Path(str(v)).expanduser().exists()]


def refuse_overlap(out: str | Path, inputs: Mapping[str, Any], what: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (`flag: path or paths`): writing it
    would replace or change what the stage reads (a model folder, a data file, a KD cache)."""
    target = Path(out).expanduser().resolve()
    for flag, value in inputs.items():
        for item in _local_paths(value):
            source = Path(item).expanduser().resolve()
            relation = ("is" if target == source else "lies inside" if source in target.parents
                        else "contains" if target in source.parents else None)
            if relation:
                raise UserError(f"{what} {out} {relation} the input {flag} {item}; give an {what} apart from the "
                                "inputs, which are never written")
