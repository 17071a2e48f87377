"""A run's cuts of the parent: the plain `pruned/` and one `pruned-<name>/` per prune variant, and the labels
of every child a run makes (what `speculate_only` may name)."""

from __future__ import annotations

from typing import Any

from selfdistill.stages import BY_NAME


def cut_folder(variant: str) -> str:
    """The folder (and child label) of a cut: `pruned`, or `pruned-<variant>` for a prune variant."""
    plain = BY_NAME["prune"].folder
    return f"{plain}-{variant}" if variant else plain


def variant_settings(variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's PruneConfig fields (everything but its name)."""
    return {k: v for k, v in variant.items() if k != "name"}


def variant_names(variants: list[Any]) -> list[str]:
    names = [v.get("name") if isinstance(v, dict) else None for v in variants]
    if not all(isinstance(n, str) and n.replace("-", "").isalnum() for n in names) or len(set(names)) < len(names):
        raise ValueError("every prune variant is a mapping with a unique name of letters, digits and '-'")
    return names


def child_labels(cfg: Any) -> list[str]:
    """Every child the run makes: the cuts, the arms and, when merging, `merged`."""
    merged = ["merged"] if cfg.merge_children and len(cfg.datasets) >= 2 else []
    return [cut_folder(""), *(cut_folder(n) for n in variant_names(cfg.prune_variants)),
            *(a.name for a in cfg.resolved_arms()), *merged]
