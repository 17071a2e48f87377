"""`selfdistill report RUN_DIR`: one report (Markdown + self-contained HTML) for a pipeline run.

It only reads what the stages wrote, at the paths the stage table gives (selfdistill/stages.py), so it
can be rerun at any time, also on a partly finished run: a section whose stage has not run is left out.
The page is a list of blocks (report/measures.py `Block`) rendered twice, as Markdown and as HTML
(report/render.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.config import opt
from selfdistill.errors import UserError
from selfdistill.evaluate.outputs import distinct_pairs
from selfdistill.guard import claim_output
from selfdistill.report.curves import size_blocks
from selfdistill.report.measures import (
    Block,
    cuts_blocks,
    drift_blocks,
    first_drift_set,
    perplexity_blocks,
    pruning_check_blocks,
)
from selfdistill.report.plots import cost_plot, retention_plot
from selfdistill.report.progress import evaluated_children, missing_message, stage_progress
from selfdistill.report.render import to_html, to_markdown
from selfdistill.rundir import atomic_write_text, read_manifest
from selfdistill.stages import distill_dirs, stage_dir, stage_output
from selfdistill.tables import MISSING, fmt, interval


@dataclass(frozen=True)
class ReportConfig:
    run_dir: str = opt("", "the run directory written by `selfdistill run`")
    out: str = opt("", "output folder (default: RUN_DIR/report)")
    overwrite: bool = opt(False, "write into an existing --out that report did not write", keyed=False)
    partial: bool = opt(False, "report what is finished even when no child has been evaluated yet (otherwise: "
                               "an error naming the incomplete stages)")

    POSITIONAL = "run_dir"


def _read(path: Path) -> Any:
    """A stage's JSON output; None when that stage has not run (yet)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _label(name: str) -> str:
    """A model's row label: the folder name, which in a run directory is the child's name (sft, sdd, ...)."""
    return Path(str(name).rstrip("/")).name


def _pruning_blocks(run: Path) -> list[Block]:
    p = _read(stage_output(run, "prune"))
    if p is None:
        return []
    params = p["parameters"]
    blocks: list[Block] = [("h2", "Pruning"), ("p", (
        f"Scorer **{p['scorer'] or 'explicit range'}** removed {p['removed_range']} of {p['layers_before']} layers "
        f"(n = {p['n']}): parameters {params['before']:,} → {params['after']:,}, FLOPs/token (2 × parameters) "
        f"−{p['flops_per_token']['reduction'] * 100:.2f} %."))]
    row = (p.get("scores") or {}).get("distances_by_start")
    if row:
        chosen = p["removed_layers"][0]
        around = ", ".join(f"l={i}: {v:.3f}" for i, v in enumerate(row)
                           if v is not None and abs(i - chosen) <= 3)
        blocks.append(("p", f"Scores around the chosen start layer {chosen}: {around}."))
    heatmap = stage_dir(run, "prune") / "distances.png"  # absent when matplotlib is not installed
    if heatmap.is_file():
        blocks.append(("img", heatmap, "layer distance heatmap"))
    return blocks + pruning_check_blocks(run) + cuts_blocks(run)


def _distill_blocks(run: Path) -> list[Block]:
    rows = []
    for dataset, folder in distill_dirs(run).items():
        stats = _read(folder / "stats.json")  # distill writes it beside its output
        if not stats:
            continue
        kept, total = stats["rewrites_kept"], stats["rows"]
        reasons = ", ".join(f"{k}: {v}" for k, v in stats["rejected_by_reason"].items())
        rows.append([dataset, total, kept, fmt(kept / total * 100 if total else None), reasons or MISSING,
                     stats["generated_tokens_total"], fmt(stats.get("tokens_per_s"))])
    if not rows:
        return []
    return [("h2", "Self-data distillation"),
            ("table", ["dataset", "rows", "rewrites kept", "kept %", "rejected by reason", "tokens", "tokens/s"], rows)]


def _model_rows(run: Path) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
    """The models table: one row per evaluated model, joining the evaluate, drift, speculate and profile
    outputs on the model's label. Before the children are evaluated it shows the parent's scores alone."""
    scores = _read(stage_output(run, "evaluate")) or _read(stage_output(run, "parent-eval")) or {}
    drift = first_drift_set(run)
    spec = _read(stage_output(run, "speculate")) or {}
    profile = _read(stage_output(run, "profile")) or {}
    drafts = {_label(d["draft"]): d for d in spec.get("drafts", [])}
    prof = {_label(m.get("model", "")): m for m in profile.get("models", [])}
    tasks = scores.get("tasks", [])
    flagged = set(scores.get("chance_tasks", []))
    headers = ["model", "params", "GFLOPs/token", "decode tok/s", *[t + (" ⚠" if t in flagged else "") for t in tasks],
               "average", "retention", "chance-corr.", "retention (signal)", "KL to parent", "top-1 agreement",
               "draft acceptance", "MAL"]
    rows = []
    pruned_profile = prof.get(stage_dir(run, "prune").name)
    for name, m in scores.get("models", {}).items():
        label = _label(name)
        # Only the parent and the pruned child are profiled: every child has the pruned child's shape and cost.
        pr = prof.get(label) or (pruned_profile if label not in prof and name != scores.get("baseline") else None)
        params = (pr or {}).get("parameters", {}).get("total")
        flops = (pr or {}).get("flops_per_token_paper")
        decode = (pr or {}).get("decode_tokens_per_s")
        d, s = drift.get(label, {}), drafts.get(label, {})
        rows.append([label, fmt(params, 1, 1e-6, " M"), fmt(flops, 3, 1e-9), fmt(decode),
                     *[fmt(m["tasks"].get(t, {}).get("value"), 1, 100) for t in tasks], fmt(m.get("average"), 1, 100),
                     fmt(m.get("retention")), fmt(m.get("chance_corrected_retention")),
                     fmt(m.get("retention_signal")), fmt(d.get("kl"), 3), fmt(d.get("agreement"), 1, 100),
                     fmt(s.get("draft_acceptance_rate"), 3), fmt(s.get("mean_acceptance_length"), 2)])
    return headers, rows, scores


def _plots(run: Path, out: Path, scores: dict[str, Any]) -> list[Block]:
    """Retention per child with its interval, and retention against cost (report/plots.py)."""
    profile = _read(stage_output(run, "profile")) or {}
    flops = {_label(m.get("model", "")): m.get("flops_per_token_paper") for m in profile.get("models", [])}
    to_giga = {k: v * 1e-9 for k, v in flops.items() if v}
    parent, child = to_giga.get(_label(scores.get("baseline") or "")), to_giga.get(stage_dir(run, "prune").name)
    made = [(retention_plot(scores, out / "retention.png", _label), "Retention per child"),
            (cost_plot(scores, parent, child, out / "retention_vs_flops.png", _label), "Retention vs cost")]
    return [("img", path, title) for path, title in made if path is not None]


def _comparison_blocks(scores: dict[str, Any]) -> list[Block]:
    pairs = distinct_pairs(scores)
    if not pairs:
        return []
    rows = [[_label(p["a"]), _label(p["b"]), p["over"], fmt(p.get("retention_diff"), 2),
             interval(p["ci95"], 2)] for p in pairs]
    return [("h2", "Paired comparisons"), ("p", "Retention difference a − b in points, paired bootstrap 95 % interval "
             "over evaluation items; an interval that contains 0 means the data cannot tell the two apart."),
            ("table", ["a", "b", "tasks", "difference", "95 % interval"], rows)]


def _cost_blocks(run: Path) -> list[Block]:
    profile = _read(stage_output(run, "profile"))
    if not profile:
        return []
    rows = [[_label(m["model"]), m["layers"], f"{m['parameters']['total']:,}", fmt(m["flops_per_token_paper"], 3, 1e-9),
             fmt(m.get("flops_per_token_executed"), 3, 1e-9), fmt(m.get("prefill_tokens_per_s")),
             fmt(m.get("decode_tokens_per_s")), fmt(m.get("decode_speedup"), 2)] for m in profile["models"]]
    return [("h2", "Cost"), ("p", f"FLOPs per token as the paper counts them (2 × parameters) and as executed "
             f"(torch FlopCounterMode, eager attention, sequence length {profile['seq_len']}); latency medians of "
             f"{profile['runs']} runs, {profile['dtype']} on {profile['device']} ({profile.get('threads')} threads)."),
            ("table", ["model", "layers", "parameters", "GFLOPs/token (paper)", "GFLOPs/token (executed)",
                       "prefill tok/s", "decode tok/s", "decode speed-up"], rows)]


def _speculate_blocks(run: Path) -> list[Block]:
    spec = _read(stage_output(run, "speculate"))
    if not spec:
        return []
    from selfdistill.speculative import comparison_lines, mal_text

    rows = [[_label(d["draft"]), fmt(d["draft_acceptance_rate"], 3), mal_text(d),
             " ".join(f"{a:.2f}" for a in d["acceptance_per_position"]), d["target_forward_passes"],
             fmt(d.get("speedup_ours"), 2), fmt(d.get("speedup_hf_assisted"), 2),
             "yes" if d["lossless"] else "NO"] for d in spec["drafts"]]
    blocks: list[Block] = [("h2", "Children as speculative drafts"), ("p", (
        f"Greedy draft-then-verify, k = {spec['k']}, {spec['prompts']} prompts, up to {spec['max_new_tokens']} new "
        "tokens; MAL = tokens emitted per target forward pass, with its 95 % interval over prompts. Speed-ups "
        "are wall-clock against the target alone.")),
        ("table", ["draft", "acceptance rate", "MAL", "acceptance by position", "target passes",
                   "speed-up (ours)", "speed-up (HF assisted)", "lossless"], rows)]
    return blocks + [("p", line + ".") for line in comparison_lines(spec, _label)]


def _stage_times(run: Path) -> list[Block]:
    """Wall time per stage folder, from the manifests `selfdistill run` writes (a folder without one is
    unfinished, or not a stage's)."""
    rows = []
    for folder in sorted(p for p in run.iterdir() if p.is_dir() and p.name != "report"):
        m = read_manifest(folder)
        if m and "stage" in m:
            rows.append([folder.name, m["stage"], fmt(m.get("wall_time_s"), 0), m.get("started", "")])
    return [("h2", "Stages"), ("table", ["folder", "stage", "wall time (s)", "started"], rows)] if rows else []


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Write report.md, report.html (images embedded) and plots for a run directory."""
    run = Path(cfg.run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    if not (run / "config.yaml").is_file() and not any(read_manifest(p) for p in run.iterdir() if p.is_dir()):
        raise UserError(f"{run} is not a run directory (no config.yaml and no stage folder with a manifest.json); "
                        "give the run_dir of `selfdistill run`")
    if not cfg.partial and evaluated_children(run) == 0:  # a page of zero models would read like a result
        raise UserError(missing_message(run))
    out = Path(cfg.out) if cfg.out else stage_dir(run, "report")
    with claim_output(out, "report", folder=True, overwrite=cfg.overwrite) as claim:
        claim.commit()
        return _report(run, out)


def _report(run: Path, out: Path) -> dict[str, Any]:
    """The page in the order of the method: pruning, distillation, the models, drift, cost, drafts, times."""
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    headers, rows, scores = _model_rows(run)
    blocks: list[Block] = [("h1", f"selfdistill report: {run.name}"),
                           ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {run}.")]
    _, incomplete = stage_progress(run)
    if incomplete:
        blocks.append(("p", f"**Partial report**: incomplete stages: {', '.join(incomplete)}."))
    blocks += _pruning_blocks(run) + _distill_blocks(run)
    if rows:
        settings = scores.get("settings", {})
        blocks += [("h2", "Models"), ("table", headers, rows), ("p", (
            "Scores in %; retention = child average / parent average × 100; chance-corrected = "
            "(child − chance)/(parent − chance); ⚠ marks tasks where the parent is within two standard errors of "
            f"chance (left out of 'retention (signal)'). Evaluation: preset {settings.get('preset', '?')}, "
            f"harness {settings.get('harness', '?')}, "
            f"{settings.get('subset', '')}."))]
        blocks += perplexity_blocks(scores, _label)
        blocks += _plots(run, out, scores) + size_blocks(run, out, scores, stage_dir(run, "prune").name, _label)
        blocks += _comparison_blocks(scores) + drift_blocks(run)
    # Cost and drafts do not need the evaluation: they show as soon as their stages have run.
    blocks += _cost_blocks(run) + _speculate_blocks(run) + _stage_times(run)
    if config:
        blocks += [("h2", "Resolved config"), ("p", "See config.yaml in the run directory.")]
    atomic_write_text(out / "report.md", to_markdown(blocks, out))
    atomic_write_text(out / "report.html", to_html(blocks))
    return {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"), "models": len(rows)}
