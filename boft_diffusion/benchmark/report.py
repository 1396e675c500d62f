"""Ratios with their spread, the verdict against the bar and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

from .presets import METHODS


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio_spread(per_round: list[list[float]]) -> dict[str, Any] | None:
    """Median and spread of a ratio from its samples, one list per round (see the module docstring).

    ``median``: of the per-round medians; ``low`` / ``high``: the lowest and highest per-round
    median, or with a single round the lowest and highest sample (``spread_over`` says which).
    """
    rounds = [statistics.median(values) for values in per_round if values]
    if not rounds:
        return None
    samples = rounds if len(rounds) > 1 else [v for values in per_round for v in values]
    return {
        "median": statistics.median(rounds),
        "low": min(samples),
        "high": max(samples),
        "per_round": rounds,
        "spread_over": "rounds" if len(rounds) > 1 else "repeats",
    }


def _pairs(run: dict[str, Any], key: str, reference: str) -> list[float]:
    """``key / reference`` for each measurement and the adapter-off one timed next to it."""
    return [t / r for t, r in zip(run[key], run[reference])]


def _relative(samples: list[float], reference: list[float]) -> list[float]:
    """Samples of one round divided by the median of the reference's samples in that round."""
    middle = _median(reference)
    return [s / middle for s in samples] if middle else []


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per method: times pooled over every repeat of every round (memory: over rounds), and
    every ratio with its spread (:func:`ratio_spread`).

    Ratios to the floor pair each step with the floor step timed next to it in the same worker, a
    forward with the base forward; ratios to LoRA divide a round's figure by LoRA's of that round.
    """
    keys = ("step_s", "floor_step_s", "forward_base_s", "forward_unmerged_s", "forward_merged_s", "merge_s")
    lora = runs.get("lora")
    summary = {}
    for key, per_round in runs.items():
        pooled = {k: [v for run in per_round for v in run[k]] for k in keys}
        step_floor = [_pairs(run, "step_s", "floor_step_s") for run in per_round]
        memory = [[run["peak_memory_bytes"] / 1e9] for run in per_round]
        vs_lora: dict[str, Any] = {"step_vs_lora": None, "memory_vs_lora": None}
        if lora:
            pairs = list(zip(per_round, lora))
            vs_lora["step_vs_lora"] = ratio_spread(
                [
                    _relative(s, _pairs(ref, "step_s", "floor_step_s"))
                    for s, (_, ref) in zip(step_floor, pairs)
                ]
            )
            vs_lora["memory_vs_lora"] = ratio_spread(
                [[run["peak_memory_bytes"] / ref["peak_memory_bytes"]] for run, ref in pairs]
            )
        summary[key] = {
            "label": METHODS[key].label,
            "trainable_params": per_round[0]["trainable_params"],
            "latent_size": per_round[0].get("latent_size"),
            "step_s": _median(pooled["step_s"]),
            "floor_step_s": _median(pooled["floor_step_s"]),
            "step_vs_floor": ratio_spread(step_floor),
            "step_vs_lora": vs_lora["step_vs_lora"],
            "peak_memory_gb": _median([m for (m,) in memory]),
            "memory_vs_lora": vs_lora["memory_vs_lora"],
            "forward_base_s": _median(pooled["forward_base_s"]),
            "forward_unmerged_s": _median(pooled["forward_unmerged_s"]),
            "forward_merged_s": _median(pooled["forward_merged_s"]),
            "unmerged_vs_base": ratio_spread(
                [_pairs(run, "forward_unmerged_s", "forward_base_s") for run in per_round]
            ),
            "merged_vs_base": ratio_spread(
                [_pairs(run, "forward_merged_s", "forward_base_s") for run in per_round]
            ),
            "merge_s": _median(pooled["merge_s"]),
            "rounds": len(per_round),
            "samples": {k: len(v) for k, v in pooled.items()},
        }
    return summary


DEFAULT_BAR = 1.05
"""Default ``--bar``: the step × LoRA that the "≤ bar" column tests the whole spread against."""


def verdict(ratio: dict[str, Any] | None, bar: float) -> str:
    """``yes`` when the whole spread is at or under ``bar``, ``no`` when all above, else ``unclear``."""
    if ratio is None:
        return "—"
    if ratio["high"] <= bar:
        return "yes"
    if ratio["low"] > bar:
        return "no"
    return "unclear"


def table_note(bar: float = DEFAULT_BAR) -> str:
    return (
        "Ratios: median over rounds (lowest–highest round; with one round, lowest–highest paired "
        "repeat). × floor pairs each step with a floor step timed next to it in the same worker (the "
        "floor: adapter off, zero-cost taps on the adapted layers, so the backward still reaches "
        "them); × LoRA divides by LoRA's figure of the same round; × base pairs each forward with an "
        f"adapter-off forward. ≤ {bar:g}: step × LoRA under {bar:g} for the whole spread (yes), above "
        "it for the whole spread (no), or straddling it (unclear). Memory: peak of the training phase."
    )


TABLE_NOTE = table_note()


def format_table(summary: dict[str, dict[str, Any]], bar: float = DEFAULT_BAR) -> str:
    """Markdown table: absolute figures and ratios (median and spread) against LoRA, the floor and the
    base forward (see :func:`table_note`)."""

    def cell(value: float | None, fmt: str = ".2f") -> str:
        return "—" if value is None else format(value, fmt)

    def spread(ratio: dict[str, Any] | None) -> str:
        if ratio is None:
            return "—"
        return f"{ratio['median']:.2f} ({ratio['low']:.2f}–{ratio['high']:.2f})"

    head = ("| method | trainable params | s/step | × LoRA | ≤ " + f"{bar:g}" + " | × floor | peak mem (GB) "
            "| × LoRA | unmerged fwd (s) | × base | merged fwd (s) | × base | merge (s) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for s in summary.values():
        lines.append("| " + " | ".join([
            s["label"], f"{s['trainable_params']:,}",
            cell(s["step_s"]), spread(s.get("step_vs_lora")), verdict(s.get("step_vs_lora"), bar),
            spread(s["step_vs_floor"]),
            cell(s["peak_memory_gb"]), spread(s.get("memory_vs_lora")),
            cell(s["forward_unmerged_s"]), spread(s["unmerged_vs_base"]),
            cell(s["forward_merged_s"]), spread(s["merged_vs_base"]),
            cell(s["merge_s"]),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The table, its note and the methods not measured (with why)."""
    text = format_table(report["summary"], report["bar"]) + "\n\n" + table_note(report["bar"])
    for key, reason in report["unavailable"].items():
        text += f"\nnot measured: {key} ({METHODS[key].label}): {reason}"
    for key, error in report.get("failed", {}).items():
        text += f"\nfailed: {key} ({METHODS[key].label}): {error}"
    return text
