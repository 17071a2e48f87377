"""scores.json's body from lm-eval's per-sample output: task scores, retention and its intervals, pairwise
differences, and the language-modelling tasks' perplexities with their own retention (perplexity.py)."""

from __future__ import annotations

import itertools
from typing import Any

from selfdistill.evaluate.perplexity import per_doc_ll, perplexity_retention, perplexity_score
from selfdistill.evaluate.presets import TaskSpec, accuracy_tasks, perplexity_tasks
from selfdistill.evaluate.retention import paired_bootstrap, per_doc, retention, retention_interval, signal_tasks, task_score


def _task_samples(res: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Logged samples of a task, or of all leaves of a group (mmlu: groups of subjects), each doc id
    prefixed with its leaf ("<leaf>/<doc_id>"): every leaf numbers its documents from 0."""
    samples = res.get("samples", {})
    if task in samples:
        return samples[task]
    out = []
    for child in res.get("group_subtasks", {}).get(task, []):
        if child in samples:
            out.extend(s | {"doc_id": f"{child}/{s['doc_id']}"} for s in samples[child])
        else:  # a sub-group: its leaves are already prefixed
            out.extend(_task_samples(res, child))
    return out


def score_models(raw: dict[str, dict[str, Any]], specs: dict[str, TaskSpec], baseline: str | None,
                 bootstrap_iters: int, seed: int) -> dict[str, Any]:
    """scores.json body (without settings): per-model task scores, retention, pairwise intervals; the
    perplexities of the language-modelling tasks apart, with their own retention (evaluate/perplexity.py)."""
    acc_specs = {t: specs[t] for t in accuracy_tasks(specs)}
    ppl_specs = {t: specs[t] for t in perplexity_tasks(specs)}
    models: dict[str, Any] = {}
    docs: dict[str, dict[str, dict[Any, float]]] = {}
    for name, res in raw.items():
        tasks = {t: task_score(_task_samples(res, s.task), s.metric) for t, s in acc_specs.items()}
        for t in tasks:  # per model too, so a run without a baseline still shows which tasks carry signal
            tasks[t]["at_chance"] = t not in signal_tasks({t: tasks[t]})
        docs[name] = {t: per_doc(_task_samples(res, s.task), s.metric) for t, s in acc_specs.items()}
        vals = [v["value"] for v in tasks.values()]
        models[name] = {"tasks": tasks, "average": sum(vals) / len(vals) if vals else float("nan")}
        if ppl_specs:
            models[name]["perplexity"] = {t: perplexity_score(_task_samples(res, s.task), s.perplexity)
                                          for t, s in ppl_specs.items()}
    out: dict[str, Any] = {"models": models, "tasks": list(acc_specs), "baseline": baseline, "pairwise": []}
    if ppl_specs:
        out["perplexity_tasks"] = list(ppl_specs)
    if baseline is None:
        return out
    _perplexity_retention(raw, ppl_specs, models, baseline, bootstrap_iters, seed)
    parent = models[baseline]["tasks"]
    signal = signal_tasks(parent)
    out["chance_tasks"] = [t for t in acc_specs if t not in signal]
    out["signal_tasks"] = signal
    for name, m in models.items():
        full, sig = retention(m["tasks"], parent), retention(m["tasks"], parent, signal)
        m.update(retention=full["retention"], chance_corrected_retention=full["chance_corrected_retention"],
                 per_task_ratio=full["per_task_ratio"], per_task_chance_corrected=full["per_task_chance_corrected"],
                 retention_signal=sig["retention"], chance_corrected_retention_signal=sig["chance_corrected_retention"])
        if name != baseline:  # the interval a plot's error bar shows: the child's items against the parent's
            for key, tasks in (("retention_ci95", list(acc_specs)), ("retention_signal_ci95", signal)):
                m[key] = retention_interval({t: docs[name][t] for t in tasks}, {t: docs[baseline][t] for t in tasks},
                                            iters=bootstrap_iters, seed=seed)
    children = [n for n in models if n != baseline]
    for a, b in itertools.combinations(children, 2):
        for which, tasks in (("all", list(acc_specs)), ("signal", signal)):
            a_docs, b_docs, p_docs = ({t: docs[n][t] for t in tasks} for n in (a, b, baseline))
            ci = paired_bootstrap(a_docs, b_docs, p_docs, iters=bootstrap_iters, seed=seed)
            out["pairwise"].append({"a": a, "b": b, "over": which, **ci})
    return out


def _perplexity_retention(raw: dict[str, dict[str, Any]], ppl_specs: dict[str, TaskSpec], models: dict[str, Any],
                          baseline: str, iters: int, seed: int) -> None:
    """Each model's `perplexity_retention` per language-modelling task: parent ppl / child ppl x 100, with a
    paired bootstrap interval over documents."""
    if not ppl_specs:
        return
    lls = {name: {t: per_doc_ll(_task_samples(res, s.task), s.perplexity) for t, s in ppl_specs.items()}
           for name, res in raw.items()}
    for name, m in models.items():
        m["perplexity_retention"] = {t: perplexity_retention(lls[name][t], lls[baseline][t], iters=iters, seed=seed)
                                     for t in ppl_specs}
