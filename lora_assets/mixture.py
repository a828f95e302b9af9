"""Weighted mixtures of cleaned datasets: which rows of each source one epoch trains on, written as a dataset of
its own so that training, its cache and evaluation read it like any cleaned dataset.

The rule: every source contributes rows in proportion to its weight, as many as fit without repeating a row. So
the source that is scarcest relative to its weight is used in full and the others are sampled; with weights
0.7 / 0.3 and 1,000 / 200 train rows, that is 466 + 200 rows. Which rows a source gives is a seeded hash order of
their content, so the selection depends on the data, the weights and the seed alone (not on file order or machine).
A row that occurs in two sources is trained once (counted as a duplicate of the later one). Evaluation uses every
source's eval split, rows interleaved so that a cap on eval rows still takes from each, every row tagged with its
source (metrics per source), and without the rows whose prompt is also a training prompt of the mixture.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

from lora_assets.clean import CleanReport, read_split
from lora_assets.clean.report import MixtureSource
from lora_assets.files import write_json_atomic

#: Part of every mixture fingerprint: raise it when a change here changes which rows are selected.
MIXER_VERSION = 1
#: The folder under the home's datasets dir that holds mixtures (a name no dataset can have: names start with a
#: letter or digit).
MIXTURES_DIR = "_mixtures"


def mixture_counts(available: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Rows per source: proportional to the weights, the largest total that repeats no row.

    The total is ``min(available / weight)`` over the sources, and each share is rounded down, then the rows
    left by rounding go to the largest remainders (never beyond what a source has).
    """
    total_w = sum(weights.values())
    w = {k: v / total_w for k, v in weights.items()}
    total = min(available[k] / w[k] for k in w)
    exact = {k: w[k] * total for k in w}
    counts = {k: min(available[k], math.floor(exact[k] + 1e-9)) for k in w}
    left = math.floor(total + 1e-9) - sum(counts.values())
    for k in sorted(w, key=lambda k: exact[k] - counts[k], reverse=True):
        if left <= 0:
            break
        if counts[k] < available[k]:
            counts[k] += 1
            left -= 1
    return counts


def _ranked(rows: list[dict], seed: int) -> list[dict]:
    """The rows in a seeded hash order of their content ids: the selection order."""
    return sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())


def _prompt_key(row: dict) -> str:
    return json.dumps(row["messages"][:-1], sort_keys=True)


def _fingerprint(reports: dict[str, CleanReport], weights: dict[str, float], seed: int) -> str:
    payload = {
        "sources": [[n, reports[n].fingerprint, round(weights[n], 9)] for n in weights],
        "seed": seed,
        "mixer": MIXER_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _select(
    reports: dict[str, CleanReport], weights: dict[str, float], seed: int
) -> tuple[list[dict], dict[str, tuple[int, int]]]:
    """The mixture's train rows (tagged with ``dataset``) and, per source, (selected, duplicates skipped)."""
    train = {n: read_split(reports[n], "train") for n in weights}
    counts = mixture_counts({n: len(rows) for n, rows in train.items()}, weights)
    seen: set[str] = set()
    selected, stats = [], {}
    for name in weights:
        taken, skipped = 0, 0
        for row in _ranked(train[name], seed):
            if taken == counts[name]:
                break
            if row["id"] in seen:
                skipped += 1
                continue
            seen.add(row["id"])
            selected.append(row | {"dataset": name})
            taken += 1
        stats[name] = (taken, skipped)
    return selected, stats


def _eval_rows(reports: dict[str, CleanReport], train_rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Every source's eval rows, interleaved round robin, without prompts the mixture trains on."""
    train_prompts = {_prompt_key(r) for r in train_rows}
    per_source, leaks = {}, {}
    for name, report in reports.items():
        rows = read_split(report, "eval")
        kept = [r | {"dataset": name} for r in rows if _prompt_key(r) not in train_prompts]
        per_source[name], leaks[name] = kept, len(rows) - len(kept)
    interleaved = []
    for i in range(max((len(v) for v in per_source.values()), default=0)):
        interleaved += [rows[i] for rows in per_source.values() if i < len(rows)]
    return interleaved, leaks


def mix_datasets(
    reports: dict[str, CleanReport], weights: dict[str, float], seed: int, datasets_root: Path
) -> CleanReport:
    """Write the mixture of ``reports`` (cleaned sources, by name) with ``weights`` as a cleaned dataset under
    ``datasets_root/_mixtures/<fingerprint>/`` and return its report (``mixture`` lists each source's counts and
    fingerprint). The same sources, weights and seed give the same folder, written once."""
    empty = [n for n in weights if reports[n].rows_train == 0]
    if empty:
        raise ValueError(
            f"mixture sources {empty} have no train rows, so no row of any source can be selected in proportion to "
            "the weights. Fix: add data to them or remove them from the adapter's `datasets`."
        )
    fingerprint = _fingerprint(reports, weights, seed)
    out_dir = Path(datasets_root) / MIXTURES_DIR / fingerprint
    if (out_dir / "report.json").exists():
        return CleanReport.model_validate_json((out_dir / "report.json").read_text())
    train_rows, stats = _select(reports, weights, seed)
    eval_rows, leaks = _eval_rows(reports, train_rows)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{fingerprint}."))  # one of its own per writer
    for split, rows in (("train", train_rows), ("eval", eval_rows), ("quarantine", [])):
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sources = [
        MixtureSource(
            dataset=n,
            weight=round(weights[n], 6),
            fingerprint=reports[n].fingerprint,
            rows_available=reports[n].rows_train,
            rows_selected=stats[n][0],
            duplicates_skipped=stats[n][1],
            rows_eval=sum(r["dataset"] == n for r in eval_rows),
            eval_leaks_dropped=leaks[n],
        )
        for n in weights
    ]
    report = _report(reports, sources, fingerprint, out_dir, len(train_rows), len(eval_rows))
    write_json_atomic(tmp / "report.json", report.model_dump(mode="json"), indent=2)
    try:
        tmp.rename(out_dir)  # published whole; a process that got there first wrote the same rows
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "report.json").exists():
            raise
    return CleanReport.model_validate_json((out_dir / "report.json").read_text())


def _report(
    reports: dict[str, CleanReport],
    sources: list[MixtureSource],
    fingerprint: str,
    out_dir: Path,
    n_train: int,
    n_eval: int,
) -> CleanReport:
    formats = sorted({r.detected_format for r in reports.values()})
    return CleanReport(
        dataset="+".join(reports),
        source="mixture: " + ", ".join(f"{s.dataset} {s.weight:.2f}" for s in sources),
        files=[f for r in reports.values() for f in r.files],
        source_sha256=hashlib.sha256("".join(r.source_sha256 for r in reports.values()).encode()).hexdigest(),
        fingerprint=fingerprint,
        detected_format=formats[0] if len(formats) == 1 else "mixed: " + ", ".join(formats),
        format_reason="; ".join(f"{n}: {r.format_reason}" for n, r in reports.items()),
        rows_in=n_train + n_eval,
        rows_train=n_train,
        rows_eval=n_eval,
        rows_quarantined=0,
        by_reason={},
        pii_redactions={},
        leakage_moved_to_train=0,
        output_dir=str(out_dir),
        mixture=sources,
    )


def describe(report: CleanReport) -> str:
    """One line per source of a mixture, for logs and the CLI: weight, rows selected of available, fingerprint."""
    return "; ".join(
        f"{s.dataset} (weight {s.weight:.2f}): {s.rows_selected} of {s.rows_available} train rows, "
        f"{s.rows_eval} eval rows, fingerprint {s.fingerprint}"
        for s in report.mixture
    )
