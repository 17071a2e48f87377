"""Report sections for what is measured beside accuracy: pruning's held-out check and drift with intervals.

Kept apart from report/__init__.py (which lays out the page) so each stays small; both read only stage outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfdistill.stages import stage_output
from selfdistill.tables import fmt, fmt_perplexity, interval

Block = tuple  # ("h2", text) | ("p", text) | ("table", headers, rows) | ("img", path, alt)


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def cuts_blocks(run: Path) -> list[Block]:
    """With prune variants: every cut of the parent side by side (block, how it was chosen, its repair and
    the held-out next-token loss of the plain and the repaired cut)."""
    folders = sorted(run.glob("pruned-*/pruning.json"))
    if not folders:
        return []
    rows = []
    for path in [stage_output(run, "prune"), *folders]:
        p = _read(path)
        if p is None:
            continue
        r = p.get("replacement") or {}
        base = (p.get("heldout_check") or {}).get("base_loss")
        plain = r.get("heldout_loss_plain")
        if plain is None and base is not None:  # no repair: the plain cut's loss is the block's check
            plain = next((base + c["heldout_loss_increase"] for c in p["heldout_check"]["candidates"]
                          if c["start"] == p["removed_layers"][0]), None)
        applied = {True: "applied", False: "not applied (raised the loss)"}.get(r.get("applied"), "–")
        rows.append([path.parent.name, f"{p['removed_layers'][0]}..{p['removed_layers'][-1]}", p["chosen_by"],
                     r.get("method", "none"), fmt(plain, 3), fmt(r.get("heldout_loss_replaced"), 3),
                     applied if r else "–", f"{p['layers_after']}", f"{p['parameters']['after']:,}"])
    return [("p", "The cuts of the parent: block removed, how it was chosen, the repair, and the next-token loss "
                  "(nats) of the plain and the repaired cut on the held-out calibration rows."),
            ("table", ["child", "block", "chosen by", "repair", "held-out loss, cut", "held-out loss, repaired",
                       "repair", "layers", "parameters"], rows)]


def pruning_check_blocks(run: Path) -> list[Block]:
    """The best candidate blocks' held-out loss increase, and the warning when the choice looks costly."""
    pruning = _read(stage_output(run, "prune")) or {}
    check = pruning.get("heldout_check")
    if not check:
        return []

    def label(c: dict[str, Any]) -> str:
        notes = [n for n, on in (("removed", c["start"] == pruning["removed_layers"][0]),
                                 ("scorer's choice", c["chosen"])) if on]
        return c["layers"] + (f" ({', '.join(notes)})" if notes else "")

    rows = [[label(c), fmt(c["score"], 4), fmt(c["heldout_loss_increase"], 3)] for c in check["candidates"]]
    blocks: list[Block] = [("p", (f"The best-scored blocks, checked on {check['rows']} held-out calibration rows "
                                  f"({check['tokens']} tokens, parent loss {check['base_loss']:.3f} nats): next-token "
                                  "loss increase when the block is skipped.")),
                           ("table", ["block", "score", "held-out loss increase (nats)"], rows)]
    if check.get("warning"):
        blocks.append(("p", f"**Warning:** {check['warning']}."))
    return blocks


def first_drift_set(run: Path) -> dict[str, Any]:
    """The children's drift on the first (training-domain, held-out) prompt set, by child label."""
    sets = (_read(stage_output(run, "drift")) or {}).get("sets") or {}
    return next(iter(sets.values()), {}).get("children", {})


def drift_blocks(run: Path) -> list[Block]:
    """Per prompt set: KL and agreement per child with intervals, then the paired differences."""
    drift = _read(stage_output(run, "drift")) or {}
    blocks: list[Block] = []
    for name, s in (drift.get("sets") or {}).items():
        rows = [[label, fmt(c["kl"], 3), interval(c.get("kl_ci95")), fmt(c["agreement"], 1, 100),
                 interval(c.get("agreement_ci95"), 1, 100), c["prompts"], c["tokens"]]
                for label, c in s["children"].items()]
        split = "" if Path(s["source"]).is_file() else f"split {s['split']}, "  # a file has no splits
        blocks += [("p", f"**{name}**: {len(s['rows'])} rows of {Path(s['source']).name} "
                         f"({split}from row {s['offset']}), none of them trained on."),
                   ("table", ["child", "KL to parent", "95 % interval", "top-1 agreement %", "95 % interval",
                              "prompts", "tokens"], rows)]
        pairs = [[p["a"], p["b"], fmt(p["kl_diff"], 3), interval(p.get("kl_diff_ci95")),
                  fmt(p["agreement_diff"], 1, 100), interval(p.get("agreement_diff_ci95"), 1, 100)]
                 for p in s.get("paired", [])]
        if pairs:
            blocks.append(("table", ["a", "b", "KL a − b", "95 % interval", "agreement a − b (points)",
                                     "95 % interval"], pairs))
    if not blocks:
        return []
    return [("h2", "Drift from the parent"), ("p", (
        "KL(parent ‖ child) and top-1 agreement per answer token, teacher-forcing the parent's greedy answers; "
        "bootstrap 95 % intervals over prompts, paired on the same draws for differences."))] + blocks


def perplexity_blocks(scores: dict[str, Any], label: Any) -> list[Block]:
    """The language-modelling tasks: each model's perplexity and its perplexity retention (parent ppl / model
    ppl × 100) with the bootstrap interval over documents — beside the accuracy retention, never in it."""
    tasks = scores.get("perplexity_tasks") or []
    if not tasks:
        return []
    metrics = {t: scores.get("settings", {}).get("tasks", {}).get(t, {}).get("perplexity", "perplexity,none")
               for t in tasks}
    headers = ["model"]
    for t in tasks:
        headers += [f"{t} {metrics[t].partition(',')[0]}", f"{t} retention", "95 % interval"]
    rows = []
    for name, m in scores.get("models", {}).items():
        row = [label(name)]
        for t in tasks:
            ppl = (m.get("perplexity") or {}).get(t) or {}
            ret = (m.get("perplexity_retention") or {}).get(t) or {}
            row += [fmt_perplexity(ppl.get("value")), fmt(ret.get("retention")),
                    interval(ret.get("ci95"), 1) if name != scores.get("baseline") else "–"]
        rows.append(row)
    n_docs = ", ".join(f"{t}: {next(iter(scores['models'].values()))['perplexity'][t].get('n')} documents"
                       for t in tasks if scores.get("models"))
    return [("h2", "Language modelling"), ("p", (
        "Perplexity (lower is better) of each model; perplexity retention = parent perplexity / model perplexity "
        f"× 100, with a paired bootstrap 95 % interval over documents ({n_docs}). It is its own measure: the "
        "accuracy retention above does not include it.")), ("table", headers, rows)]
