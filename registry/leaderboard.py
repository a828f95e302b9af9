"""Leaderboards over the registry's `leaderboard` view: one row per version, or per sweep point across seeds."""

from __future__ import annotations

import json
import math
from typing import Any

from registry.rules import LOWER_IS_BETTER, SERVABLE_STATUSES

# two-sided 95% Student t quantiles by degrees of freedom (no scipy in the runtime)
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t95(df: int) -> float:
    """The 95% two-sided t quantile for ``df`` degrees of freedom (the next tabulated smaller df; 1.96 above 30)."""
    if df > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= df)]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t confidence interval (low, high); a single value has no interval (nan)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _point(row: dict[str, Any]) -> dict[str, Any]:
    p = row.get("sweep_point")
    return (json.loads(p) if isinstance(p, str) else p) or {}


def point_label(point: dict[str, Any]) -> str:
    def short(v: Any) -> str:
        return "+".join(m.removesuffix("_proj") for m in v) if isinstance(v, list) else str(v)

    return ", ".join(f"{k}={short(v)}" for k, v in sorted(point.items())) or "-"


def across_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group versions whose sweep points differ only in `seed`; per group the mean and 95% CI of the rank metric,
    best first (lower first for losses). Rejected and archived versions are included: a seed that failed its gate
    is part of the result."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        point = {k: v for k, v in _point(r).items() if k != "seed"}
        groups.setdefault(json.dumps(point, sort_keys=True), []).append(r)
    out = []
    for key, members in groups.items():
        values = [m["metric_value"] for m in members if m["metric_value"] is not None]
        if not values:
            continue
        mean, low, high = mean_ci(values)
        out.append(
            {
                "point": json.loads(key),
                "label": point_label(json.loads(key)),
                "seeds": len(values),
                "metric": members[0]["rank_metric"],
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
                "values": values,
                "trainable_params": members[0]["trainable_params"],
                "versions": sorted(m["version"] for m in members),
            }
        )
    lower = bool(out) and out[0]["metric"] in LOWER_IS_BETTER
    out.sort(key=lambda g: g["mean"] if lower else -g["mean"])
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The per-version leaderboard as a markdown table; the winner (rank 1) is marked."""
    metric = rows[0]["rank_metric"] if rows else "metric"
    lines = [
        f"| rank | version | point | {metric} | status | trainable params | train wall s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **winner**" if r["rank"] == 1 and r["status"] in SERVABLE_STATUSES else ""
        value = "" if r["metric_value"] is None else f"{r['metric_value']:.4f}"
        params, wall, peak = r["trainable_params"] or 0, r["train_wall_s"] or 0, r["peak_memory_mb"] or 0
        lines.append(
            f"| {r['rank']}{mark} | v{r['version']} | {point_label(_point(r))} | {value} | {r['status']} | "
            f"{params:,} | {wall:.1f} | {peak:.0f} |"
        )
    return "\n".join(lines)
