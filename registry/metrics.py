"""The metric table: every evaluation metric, once, with its direction (lower or higher is better) and its scorer.

Evaluation (``lora_assets/evaluate.py``) scores answers and losses with it, the evidence module orients gains and
differences by it, the spec takes its names for gates, the registry ranks by its directions (the champion rule and
the `leaderboard` view, through ``registry.rules.LOWER_IS_BETTER``), and the catalog and the CLI pick the metrics
they show from its rows.

Why the table, scorers included, lives on the registry's floor: the registry needs each metric's direction and
imports nothing of ours, and every scorer is a pure function of plain values (no torch, no model). An *answer*
metric scores one generated answer against its reference (the row's score; the metric is the mean over the eval
rows); a *loss* metric turns the token-weighted mean loss over the assistant tokens into its value. Evaluation runs
the models, producing the answers and each row's summed token loss, and hands them to these scorers.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass


def normalize_answer(text: str) -> str:
    """Case-, whitespace- and edge-punctuation-insensitive form used by exact match."""
    text = unicodedata.normalize("NFC", text).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!?,;:'\"")


def contains_answer(output: str, reference: str) -> bool:
    """Whether the normalized reference occurs in the normalized output, starting at a word boundary.

    Fair to a chatty model that answers in a sentence ("These are all fruits." for the reference "fruit"), which
    exact match scores 0; "grapefruit" does not contain "fruit". An output naming several candidates also
    counts, so read it next to exact match, never alone.
    """
    ref = normalize_answer(reference)
    return bool(ref) and re.search(r"(?<!\w)" + re.escape(ref), normalize_answer(output)) is not None


def _char_ngrams(text: str, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(len(text) - n + 1):
        g = text[i : i + n]
        counts[g] = counts.get(g, 0) + 1
    return counts


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF in [0, 100] (character n-grams up to ``order``, whitespace ignored, recall weighted by
    ``beta``), as sacreBLEU defines it: precision and recall averaged over the orders both strings have."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    if hyp == ref:
        return 100.0
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        if not h or not r:
            continue
        match = sum(min(c, r.get(g, 0)) for g, c in h.items())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    p, rc = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + rc == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * rc / (b2 * p + rc)


def _exact_match_score(output: str, reference: str) -> float:
    return float(normalize_answer(output) == normalize_answer(reference))


def _contains_score(output: str, reference: str) -> float:
    return float(contains_answer(output, reference))


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: a name, a direction and a scorer (exactly one of ``score_answer`` and
    ``of_loss``)."""

    name: str
    """The metric's key in every ``metrics`` dict: evaluation results, registry records, gates, the catalog."""
    title: str
    """The metric's name for people (model cards)."""
    lower_is_better: bool
    """The direction; gains and differences are oriented by it so that positive always means better."""
    score_answer: Callable[[str, str], float] | None = None
    """An answer metric's score of one (generated answer, reference) pair; the metric is its mean over the rows."""
    of_loss: Callable[[float], float] | None = None
    """A loss metric's value for a token-weighted mean loss over the assistant tokens."""

    def __post_init__(self) -> None:
        if (self.score_answer is None) == (self.of_loss is None):
            raise ValueError(f"metric {self.name!r}: give exactly one of score_answer (answers) and of_loss (losses)")

    def gain(self, value: float, reference: float) -> float:
        """``value`` against ``reference``, oriented so that positive means ``value`` is better."""
        return reference - value if self.lower_is_better else value - reference

    def reaches(self, value: float, bound: float) -> bool:
        """Whether ``value`` is at least as good as ``bound`` (at most ``bound`` when lower is better)."""
        return value <= bound if self.lower_is_better else value >= bound

    @property
    def bound_op(self) -> str:
        """How :meth:`reaches` compares, for messages: ``<=`` or ``>=``."""
        return "<=" if self.lower_is_better else ">="


EXACT_MATCH = Metric("exact_match", "Exact match", lower_is_better=False, score_answer=_exact_match_score)
CONTAINS = Metric("contains", "Contains the reference", lower_is_better=False, score_answer=_contains_score)
CHRF = Metric("chrf", "chrF", lower_is_better=False, score_answer=chrf)
EVAL_LOSS = Metric("eval_loss", "Eval loss", lower_is_better=True, of_loss=float)
PERPLEXITY = Metric("perplexity", "Perplexity", lower_is_better=True, of_loss=math.exp)

#: The table, by name, in the order results list them (and the spec's error messages name them).
METRICS: dict[str, Metric] = {m.name: m for m in (EXACT_MATCH, CONTAINS, CHRF, EVAL_LOSS, PERPLEXITY)}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
#: The metrics scored on generated answers, and those computed from the token losses.
ANSWER_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS.values() if m.score_answer is not None)
LOSS_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS.values() if m.of_loss is not None)
#: The metric a version is ranked by when its adapter has no gate (the champion rule, the leaderboard view).
DEFAULT_RANK_METRIC = EVAL_LOSS.name
