"""Decisions on evidence, not on point estimates: gates with a confidence, and promotion on a paired win.

Evaluation keeps every held-out row's scores (:class:`RowScores`, in ``eval_results.json``). From them:

- :func:`gain_interval` / :func:`value_interval`: a paired bootstrap interval, at any confidence, of the adapter's
  gain over the base (or of its value), for a gate such as ``{metric: exact_match, min_gain: 0.05,
  confidence: 0.95}``, which passes only when the interval's lower bound clears the threshold;
- :func:`compare_with_champion`: a candidate against the current champion, paired on the held-out rows both were
  scored on (same row ids), for ``promote: if_significantly_better``, which promotes only when the interval of
  (candidate - champion) lies above zero.

Gains and differences are oriented so that positive means better, by each metric's direction in the metric table
(``registry.metrics``: lower eval loss and perplexity are better). :func:`bootstrap` is the one bootstrap of the
product: evaluation's reported gain intervals (``eval_results.json``) are drawn by it too.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from registry.metrics import METRICS

#: Bootstrap resamples for every interval (seeded: same scores, same interval).
BOOTSTRAP_RESAMPLES = 1000
#: Fewer paired rows than this and a comparison decides nothing (an interval over a handful of rows is noise).
MIN_PAIRED_ROWS = 10


class RowScores(BaseModel):
    """Per held-out row: an id (hash of the row), answer scores, and assistant-token losses, of base and adapter."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(description="sha256[:16] of each eval row's messages: the key rows are paired on.")
    answers: dict[str, dict[str, list[float]]] = Field(
        description="For exact_match, contains, chrf: {metric: {base: [...], adapter: [...]}}, one score per row."
    )
    losses: dict[str, list[float]] = Field(
        description="``base`` and ``adapter``: each row's summed token loss; ``tokens``: its assistant tokens."
    )


class Evidence(BaseModel):
    """A candidate against the champion, paired on shared held-out rows; stored with the promotion event."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="The metric compared (the adapter's rank metric).")
    champion_version: int = Field(description="The champion this candidate was compared with.")
    paired_rows: int = Field(description="Held-out rows both were scored on.")
    difference: float = Field(description="Candidate minus champion on the paired rows, positive = candidate better.")
    ci_low: float = Field(description="Lower bound of the interval of the difference.")
    ci_high: float = Field(description="Upper bound.")
    confidence: float = Field(description="Confidence of the interval, e.g. 0.95.")
    significant: bool = Field(description="Whether the whole interval is above zero: a significant win.")
    detail: str = Field(description="One line for people: the numbers and the decision.")


def row_id(messages: list[dict]) -> str:
    """The id an eval row is paired on: a hash of its messages."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def bootstrap(statistic, n_rows: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile interval at ``confidence`` of ``statistic(indices)`` over :data:`BOOTSTRAP_RESAMPLES` resamplings
    of the rows (the same resampled rows for both sides of a paired statistic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n_rows, n_rows)) for _ in range(BOOTSTRAP_RESAMPLES)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def _side(scores: RowScores, metric: str, side: str, rows) -> float:
    """``side``'s value of ``metric`` over ``rows`` (indices): a mean of answer scores, or the metric's value of
    the token-weighted loss (the loss itself, its exponential for perplexity)."""
    import numpy as np

    if metric in scores.answers:
        return float(np.asarray(scores.answers[metric][side])[rows].mean())
    sums, tokens = np.asarray(scores.losses[side]), np.asarray(scores.losses["tokens"])
    loss = sums[rows].sum() / max(tokens[rows].sum(), 1)
    return float(METRICS[metric].of_loss(loss))


def gain_interval(scores: RowScores, metric: str, confidence: float, seed: int = 0) -> tuple[float, float, float]:
    """The adapter's gain over the base on ``metric`` and its paired bootstrap interval (positive = better)."""
    import numpy as np

    every = np.arange(len(scores.ids))

    def gain(rows) -> float:
        return METRICS[metric].gain(_side(scores, metric, "adapter", rows), _side(scores, metric, "base", rows))

    return (gain(every), *bootstrap(gain, len(every), confidence, seed))


def value_interval(scores: RowScores, metric: str, confidence: float, seed: int = 0) -> tuple[float, float, float]:
    """The adapter's value of ``metric`` and its bootstrap interval."""
    import numpy as np

    every = np.arange(len(scores.ids))
    return (
        _side(scores, metric, "adapter", every),
        *bootstrap(lambda rows: _side(scores, metric, "adapter", rows), len(every), confidence, seed),
    )


def compare_with_champion(
    candidate: RowScores, champion: RowScores, champion_version: int, metric: str, confidence: float, seed: int = 0
) -> Evidence:
    """Candidate vs champion on the rows both were scored on, paired; significant when the interval of
    (candidate - champion) is above zero and at least MIN_PAIRED_ROWS rows are shared."""
    import numpy as np

    where = {rid: i for i, rid in enumerate(champion.ids)}
    pairs = [(i, where[rid]) for i, rid in enumerate(candidate.ids) if rid in where]
    cand_rows = np.array([p[0] for p in pairs], dtype=int)
    champ_rows = np.array([p[1] for p in pairs], dtype=int)

    def diff(sample) -> float:
        return METRICS[metric].gain(
            _side(candidate, metric, "adapter", cand_rows[sample]),
            _side(champion, metric, "adapter", champ_rows[sample]),
        )

    n = len(pairs)
    if n < MIN_PAIRED_ROWS:
        return Evidence(
            metric=metric,
            champion_version=champion_version,
            paired_rows=n,
            difference=0.0,
            ci_low=0.0,
            ci_high=0.0,
            confidence=confidence,
            significant=False,
            detail=f"not promoted: only {n} held-out rows shared with champion v{champion_version} (at least "
            f"{MIN_PAIRED_ROWS} needed to compare); were they evaluated on the same dataset?",
        )
    every = np.arange(n)
    point = diff(every)
    low, high = bootstrap(diff, n, confidence, seed)
    significant = low > 0
    verdict = "promoted: a significant win" if significant else "not promoted: no significant win"
    return Evidence(
        metric=metric,
        champion_version=champion_version,
        paired_rows=n,
        difference=round(point, 4),
        ci_low=round(low, 4),
        ci_high=round(high, 4),
        confidence=confidence,
        significant=significant,
        detail=f"{verdict} over champion v{champion_version}: {metric} difference {point:+.4f}, "
        f"{confidence:.0%} CI [{low:+.4f}, {high:+.4f}] over {n} paired held-out rows",
    )
