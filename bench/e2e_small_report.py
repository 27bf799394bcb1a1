"""Summary and table of bench/e2e_small.py's runs."""

from __future__ import annotations

import statistics

WHOLE_JOB_GOAL = 0.8  # ours / reference, median whole-job time
STALL_GOAL = 3.0  # no step above this many times its run's median


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _group(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["step_s"]]
    worst = max(max(r["step_s"]) / statistics.median(r["step_s"]) for r in runs)
    return {
        "runs": len(runs),
        "wall_s": [round(r["wall_s"], 2) for r in runs],
        "wall_median_s": round(statistics.median(r["wall_s"] for r in runs), 2),
        "first_step_median_s": round(statistics.median(r["first_step_s"] for r in runs), 2),
        "step_median_s": round(statistics.median(steps), 3),
        "step_p95_s": round(percentile(steps, 0.95), 3),
        "step_max_s": round(max(steps), 3),
        "worst_max_over_median": round(worst, 1),
        "threads": sorted({r.get("threads", "") for r in runs} - {""}),
    }


def summarise(runs: list[dict], thread_sweep: bool = False) -> dict:
    groups: dict[str, dict] = {}
    for condition in dict.fromkeys(r["condition"] for r in runs):
        for runner in dict.fromkeys(r["runner"] for r in runs):
            mine = [r for r in runs if r["condition"] == condition and r["runner"] == runner]
            if mine:
                groups[f"{condition} / {runner}"] = _group(mine)
    summary = {"groups": groups}
    if not thread_sweep:
        goals = {}
        for condition in dict.fromkeys(r["condition"] for r in runs):
            ours, ref = groups[f"{condition} / ours"], groups[f"{condition} / reference"]
            ratio = ours["wall_median_s"] / ref["wall_median_s"]
            goals[condition] = {
                "ours_over_reference": round(ratio, 2),
                "whole_job_goal_met": ratio <= WHOLE_JOB_GOAL,
                "no_stall_goal_met": ours["worst_max_over_median"] <= STALL_GOAL,
            }
        summary["goals"] = goals
    return summary


def print_table(summary: dict) -> None:
    header = (f"{'condition / runner':28} {'whole job (median)':>19} {'first step':>10} "
              f"{'step median':>11} {'p95':>7} {'max':>7} {'max/med':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, g in summary["groups"].items():
        print(f"{name:28} {g['wall_median_s']:17.1f} s {g['first_step_median_s']:8.1f} s "
              f"{g['step_median_s']:9.3f} s {g['step_p95_s']:6.2f}s {g['step_max_s']:6.2f}s "
              f"{g['worst_max_over_median']:6.1f}x")  # fmt: skip
    for condition, goal in summary.get("goals", {}).items():
        verdict = "met" if goal["whole_job_goal_met"] else "NOT met"
        stall = "met" if goal["no_stall_goal_met"] else "NOT met"
        print(f"{condition}: ours/reference = {goal['ours_over_reference']:.2f} "
              f"(goal <= {WHOLE_JOB_GOAL}: {verdict}); no step > {STALL_GOAL:g}x median: {stall}")
