"""Evaluation of an adapter against its base model on the held-out split.

Both are run at the dtype serving uses (bf16 where the hardware has it, else fp32), on the same rows, with greedy
decoding: eval loss and perplexity on assistant tokens; exact match, contains and chrF of the generated answer
against the reference. Every gain
(adapter minus base; for loss and perplexity, base minus adapter, so positive is better) carries a 95% paired
bootstrap confidence interval over the eval rows. With the same data, model and seed the numbers reproduce
exactly.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lora_assets.base_model import BaseModelRef
from lora_assets.chat import reference_text, render, tokenize_example, tool_call_scores
from lora_assets.clean import CleanReport, read_split
from lora_assets.evidence import BOOTSTRAP_RESAMPLES, RowScores, bootstrap, gain_interval, row_id, value_interval
from lora_assets.files import write_json_atomic
from lora_assets.hardware import resolve_dtype, torch_dtype
from lora_assets.methods import load_nf4_base, nf4_precision
from lora_assets.progress import report as report_progress
from lora_assets.spec import AdapterSpec, GateSpec
from registry.metrics import ANSWER_METRICS, LOSS_METRICS, METRICS, Metric

EVAL_FILE = "eval_results.json"


class GateResult(BaseModel):
    """The outcome of an adapter's quality gate."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="The metric the gate reads.")
    passed: bool = Field(description="Whether the adapter met the gate; a failed one is registered `rejected`.")
    detail: str = Field(description="`pass: ` or `fail: `, the value or gain, and what was required.")


class EvalResult(BaseModel):
    """Base vs adapter metrics, samples and the gate outcome (stored as ``eval_results.json``)."""

    model_config = ConfigDict(extra="forbid")

    metrics: dict[str, dict[str, float]] = Field(
        description="For each metric (exact_match, contains, chrf, eval_loss, perplexity): ``base``, ``adapter``, "
        "``gain``, ``gain_ci_low`` and ``gain_ci_high`` (95% paired bootstrap); gains are oriented so that positive "
        "means the adapter is better."
    )
    rows: int = Field(description="Eval rows scored (the eval split, capped at max_eval_rows).")
    generation: dict = Field(description="How answers were generated and scored: decoding, dtype, seed, ...")
    samples: list[dict] = Field(description="The first 10 rows: prompt, reference, the base's and adapter's answers.")
    gate: GateResult | None = Field(description="The gate's outcome; None when the adapter has no gate.")
    wall_s: float = Field(description="Seconds the evaluation took (for a reused result, the run that computed it).")
    precision_agreement: dict | None = Field(
        None,
        description="QLoRA only: how many greedy answers on the 4-bit training base equal those on the served "
        "base; None for LoRA.",
    )
    key: str = Field(
        "", description="What the numbers depend on (see _eval_key): equal keys give equal results, so reuse."
    )
    per_row: RowScores | None = Field(
        None,
        description="Every eval row's scores (lora_assets.evidence): gates with a confidence and paired "
        "comparisons with the champion are computed from them; None in results of lorafoundry before EVAL_VERSION 3.",
    )
    tool_calls: dict | None = Field(
        None,
        description="For the eval rows whose reference answer is a tool call: how many (`rows`), and for `base` and "
        "`adapter` the share whose first tool call in the answer has the right function name (`tool_name`), "
        "exactly the right arguments (`tool_args_exact`), and the mean share of argument fields given with the "
        "reference's value (`tool_args_fields`); None when no reference is a tool call.",
    )
    by_source: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict,
        description="For an adapter trained on a mixture: the metrics table of each source's eval rows, by "
        "dataset name (empty for one dataset).",
    )


#: Bump when a change to this module changes any number or answer an evaluation produces.
EVAL_VERSION = 4  # 3: per-row scores kept (per_row); 4: tool-call metrics, rows with tools rendered with them


def _eval_key(
    adapter_dir: Path,
    spec: AdapterSpec,
    base: BaseModelRef,
    clean: CleanReport,
    dtype: str,
    max_new_tokens: int,
    seed: int,
) -> str:
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    st = weights.stat() if weights.exists() else None
    payload = [
        EVAL_VERSION,
        str(adapter_dir),
        st and (st.st_size, st.st_mtime_ns),
        base.content_hash,
        clean.fingerprint,
        spec.max_eval_rows,
        spec.max_seq_len,
        resolve_dtype(dtype),
        max_new_tokens,
        seed,
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


#: The confidence of the gain intervals every evaluation reports (``gain_ci_low``, ``gain_ci_high``).
GAIN_CONFIDENCE = 0.95


def metric_table(
    per_row: dict[str, tuple[list[float], list[float]]],
    losses: tuple[list[float], list[float], list[int]],
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Base, adapter, gain and the gain's 95% paired bootstrap CI for every metric (gains oriented by the metric
    table, positive = the adapter is better).

    Args:
        per_row: for the answer metrics (exact match, contains, chrF), ``{metric: (base scores, adapter scores)}``.
        losses: per-row summed token losses of base and adapter, and per-row token counts; each loss metric is
            computed from their token-weighted mean (eval loss is that mean, perplexity its exponential).
        seed: the bootstrap's seed.
    """
    import numpy as np

    out: dict[str, dict[str, float]] = {}
    for name, (b, a) in per_row.items():
        b_arr, a_arr = np.asarray(b, dtype=float), np.asarray(a, dtype=float)
        diff = METRICS[name].gain(a_arr, b_arr)
        lo, hi = bootstrap(lambda idx, d=diff: float(d[idx].mean()), len(diff), GAIN_CONFIDENCE, seed)
        out[name] = {
            "base": b_arr.mean(),
            "adapter": a_arr.mean(),
            "gain": diff.mean(),
            "gain_ci_low": lo,
            "gain_ci_high": hi,
        }
    b_sum, a_sum, cnt = (np.asarray(x, dtype=float) for x in losses)

    def loss_gain(idx, metric: Metric) -> float:
        n = max(cnt[idx].sum(), 1)
        lb, la = b_sum[idx].sum() / n, a_sum[idx].sum() / n
        return float(metric.gain(metric.of_loss(la), metric.of_loss(lb)))

    total = max(cnt.sum(), 1)
    base_loss, ad_loss = b_sum.sum() / total, a_sum.sum() / total
    for metric in LOSS_METRICS:
        lo, hi = bootstrap(lambda idx, m=metric: loss_gain(idx, m), len(cnt), GAIN_CONFIDENCE, seed)
        b, a = metric.of_loss(base_loss), metric.of_loss(ad_loss)
        out[metric.name] = {"base": b, "adapter": a, "gain": metric.gain(a, b), "gain_ci_low": lo, "gain_ci_high": hi}
    return {m: {k: round(float(v), 4) for k, v in d.items()} for m, d in out.items()}


def _row_losses(model, examples: list[dict], pad_id: int, batch_size: int = 32) -> tuple[list[float], list[int]]:
    """Per row: summed cross-entropy over its assistant tokens, and how many there are."""
    import torch

    sums: list[float] = []
    counts: list[int] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            labels[j, :n] = torch.tensor(e["labels"])
            mask[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
        )
        sums += loss.sum(dim=1).tolist()
        counts += (shift_labels != -100).sum(dim=1).tolist()
    return sums, counts


def _generation_reporter(task: str, done: int, total: int, width: int, rows: int, max_new_tokens: int):
    """A stopping criterion that never stops: it reports ``task`` to :mod:`lora_assets.progress` at each decoding
    step of a batch of ``rows`` prompts padded to ``width`` tokens, after ``done`` answers of ``total``."""
    import torch
    from transformers import StoppingCriteria

    class _Reporter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            step = input_ids.shape[1] - width
            report_progress(task, done + rows * step / max_new_tokens, total, unit="answer")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return _Reporter()


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, label: str, batch_size: int = 32) -> list[str]:
    """Greedy answers to ``prompts``; reported to :mod:`lora_assets.progress` as ``generating answers (label)``
    at every decoding step (a batch counts as done in proportion to the tokens generated of ``max_new_tokens``)."""
    import torch

    outs: list[str] = []
    task = f"generating answers ({label})"
    report_progress(task, 0, len(prompts), unit="answer")
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc["input_ids"].shape[1]
        reporter = _generation_reporter(task, len(outs), len(prompts), width, enc["input_ids"].shape[0], max_new_tokens)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=[reporter],
            )
        new = gen[:, width:]
        outs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
        report_progress(task, len(outs), len(prompts), unit="answer")
    return outs


def check_gate(
    gate: GateSpec | None, metrics: dict[str, dict[str, float]], per_row: RowScores | None = None, seed: int = 0
) -> GateResult | None:
    """Apply a gate to base/adapter metrics, in the metric's direction (the metric table: lower is better for
    eval_loss and perplexity). A gate with a ``confidence`` decides on the paired bootstrap interval from
    ``per_row`` (see lora_assets.evidence)."""
    if gate is None:
        return None
    if gate.confidence is not None:
        return _check_gate_on_evidence(gate, per_row, seed)
    base, adapter = metrics[gate.metric]["base"], metrics[gate.metric]["adapter"]
    metric = METRICS[gate.metric]
    if gate.min_gain is not None:
        gain = metric.gain(adapter, base)
        passed = gain >= gate.min_gain
        detail = f"{gate.metric} gain {gain:+.4f} vs required {gate.min_gain:+.4f}"
    else:
        passed = metric.reaches(adapter, gate.min_value)
        detail = f"{gate.metric} {adapter:.4f} vs required {metric.bound_op} {gate.min_value:.4f}"
    return GateResult(metric=gate.metric, passed=passed, detail=("pass: " if passed else "fail: ") + detail)


def _check_gate_on_evidence(gate: GateSpec, per_row: RowScores | None, seed: int) -> GateResult:
    """Pass only when the interval at ``gate.confidence`` clears the threshold, not the point estimate."""
    level = f"{gate.confidence:.0%} CI"
    if per_row is None:
        detail = "no per-row scores to compute an interval from (registered or imported from elsewhere); re-evaluate"
        return GateResult(metric=gate.metric, passed=False, detail="fail: " + detail)
    if gate.min_gain is not None:
        gain, low, high = gain_interval(per_row, gate.metric, gate.confidence, seed)
        passed = low >= gate.min_gain
        detail = (
            f"{gate.metric} gain {gain:+.4f}, {level} [{low:+.4f}, {high:+.4f}]: lower bound vs required "
            f"{gate.min_gain:+.4f}"
        )
    else:
        value, low, high = value_interval(per_row, gate.metric, gate.confidence, seed)
        metric = METRICS[gate.metric]
        bound, worst = ("upper", high) if metric.lower_is_better else ("lower", low)  # the interval's worse end
        passed = metric.reaches(worst, gate.min_value)
        detail = (
            f"{gate.metric} {value:.4f}, {level} [{low:.4f}, {high:.4f}]: {bound} bound vs required "
            f"{metric.bound_op} {gate.min_value:.4f}"
        )
    return GateResult(metric=gate.metric, passed=passed, detail=("pass: " if passed else "fail: ") + detail)


def _precision_agreement(
    base: BaseModelRef,
    adapter_dir: Path,
    tokenizer,
    prompts: list[str],
    serving_outputs: list[str],
    max_new_tokens: int,
) -> dict:
    """Greedy outputs of a QLoRA adapter on its 4-bit training base against those on the served base."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_nf4_base(base.path), str(adapter_dir)).eval()
    trained = _generate(model, tokenizer, prompts, max_new_tokens, "adapter on the 4-bit base")
    same = sum(a == b for a, b in zip(trained, serving_outputs, strict=True))
    return {
        "training_precision": nf4_precision(),
        "rows": len(prompts),
        "identical_greedy_outputs": same,
        "share_identical": round(same / len(prompts), 4),
    }


def evaluate_adapter(
    adapter_dir: Path,
    spec: AdapterSpec,
    base: BaseModelRef,
    clean: CleanReport,
    dtype: str = "auto",
    max_new_tokens: int = 32,
    seed: int = 0,
) -> EvalResult:
    """Evaluate base and adapter on the held-out split and write ``eval_results.json`` into the adapter dir.

    Args:
        adapter_dir: the peft adapter dir written by training.
        spec: the adapter's settings (max_eval_rows, gate).
        base: the resolved base model.
        clean: the cleaning report of the adapter's dataset (gives the eval split).
        dtype: the dtype serving uses; a QLoRA adapter is evaluated on the unquantized base at this dtype, and
            its greedy outputs on the 4-bit base are compared with these (``precision_agreement``).
        max_new_tokens: generation budget per answer (greedy).
        seed: seeds torch and the bootstrap.
    """
    import torch

    key = _eval_key(adapter_dir, spec, base, clean, dtype, max_new_tokens, seed)
    adapter_dir = Path(adapter_dir)
    previous = _previous_result(adapter_dir, key, spec.gate, seed)
    if previous is not None:
        return previous
    t0 = time.time()
    torch.manual_seed(seed)
    rows = _eval_rows(clean, spec.max_eval_rows)
    tokenizer = _eval_tokenizer(base)
    model = _adapter_model(base, adapter_dir, dtype)
    runs = _run_base_and_adapter(model, tokenizer, rows, spec.max_seq_len, max_new_tokens)
    answers = _answer_scores(runs)
    metrics = metric_table(answers, (runs.base_sums, runs.adapter_sums, runs.counts), seed=seed)
    per_row = _row_scores(rows, answers, runs)
    del model  # free the serving-dtype model before a 4-bit one is loaded: the two never share memory
    _release_model_memory()
    agreement = (
        _precision_agreement(base, adapter_dir, tokenizer, runs.prompts, runs.adapter_outputs, max_new_tokens)
        if _trained_method(adapter_dir) == "qlora"
        else None
    )
    result = EvalResult(
        metrics=metrics,
        rows=len(rows),
        samples=_samples(rows, runs),
        gate=check_gate(spec.gate, metrics, per_row, seed),
        generation=_generation_settings(dtype, max_new_tokens, seed),
        wall_s=round(time.time() - t0, 2),
        precision_agreement=agreement,
        key=key,
        per_row=per_row,
        by_source=_metrics_by_source([r.get("dataset") for r in rows], answers, runs, seed) if clean.mixture else {},
        tool_calls=_tool_call_metrics(rows, runs),
    )
    write_json_atomic(adapter_dir / EVAL_FILE, result.model_dump(mode="json"), indent=2)
    return result


def _row_scores(rows: list[dict], answers: dict, runs) -> RowScores:
    return RowScores(
        ids=[row_id(r["messages"]) for r in rows],
        answers={m: {"base": b, "adapter": a} for m, (b, a) in answers.items()},
        losses={"base": runs.base_sums, "adapter": runs.adapter_sums, "tokens": [float(c) for c in runs.counts]},
    )


def _tool_call_metrics(rows: list[dict], runs) -> dict | None:
    """:func:`lora_assets.chat.tool_call_scores` averaged over the rows whose reference is a tool call."""
    idx = [i for i, r in enumerate(rows) if r["messages"][-1].get("tool_calls")]
    if not idx:
        return None
    out: dict = {"rows": len(idx)}
    for who, outputs in (("base", runs.base_outputs), ("adapter", runs.adapter_outputs)):
        scores = [tool_call_scores(outputs[i], rows[i]["messages"][-1]["tool_calls"]) for i in idx]
        out[who] = {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in scores[0]}
    return out


def _metrics_by_source(sources: list[str | None], answers: dict, runs, seed: int) -> dict:
    """:func:`metric_table` over each source's rows of a mixture's eval split."""
    out = {}
    for name in dict.fromkeys(sources):
        idx = [i for i, s in enumerate(sources) if s == name]
        sub = {m: ([b[i] for i in idx], [a[i] for i in idx]) for m, (b, a) in answers.items()}
        losses = tuple([xs[i] for i in idx] for xs in (runs.base_sums, runs.adapter_sums, runs.counts))
        out[str(name)] = metric_table(sub, losses, seed=seed)
    return out


def _generation_settings(dtype: str, max_new_tokens: int, seed: int) -> dict:
    return {
        "decoding": "greedy",
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "dtype": resolve_dtype(dtype),
        "seed": seed,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "chrf": "char 6-grams, beta 2",
    }


def _previous_result(adapter_dir: Path, key: str, gate: GateSpec | None, seed: int = 0) -> EvalResult | None:
    """The stored result when its key matches (same adapter, data and settings give the same numbers), with the
    gate applied again: only the gate may have changed."""
    cached = adapter_dir / EVAL_FILE
    if not cached.exists():
        return None
    previous = EvalResult.model_validate(json.loads(cached.read_text()))
    if previous.key != key:
        return None
    result = previous.model_copy(update={"gate": check_gate(gate, previous.metrics, previous.per_row, seed)})
    if result.gate != previous.gate:  # the quality_gate check reads the file: keep it the verdict of now
        write_json_atomic(cached, result.model_dump(mode="json"), indent=2)
    return result


def _eval_rows(clean: CleanReport, max_rows: int) -> list[dict]:
    rows = read_split(clean, "eval")[:max_rows]
    if not rows:
        raise ValueError(
            f"dataset {clean.dataset!r} has no eval rows. Fix: raise datasets.{clean.dataset}."
            "eval_fraction or add data."
        )
    return rows


def _eval_tokenizer(base: BaseModelRef):
    """The base's tokenizer, padding on the left so that batched generation continues every prompt in place."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_model(base: BaseModelRef, adapter_dir: Path, dtype: str):
    """The base at ``dtype`` with the adapter loaded, in eval mode (``disable_adapter()`` gives the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch_dtype(dtype))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model


@dataclass
class _EvalRuns:
    """Per eval row: the prompt, the reference answer, and base and adapter losses and greedy answers."""

    prompts: list[str]
    references: list[str]
    base_sums: list[float]  # summed loss over the row's assistant tokens
    adapter_sums: list[float]
    counts: list[int]  # assistant tokens in the row
    base_outputs: list[str]
    adapter_outputs: list[str]


def _run_base_and_adapter(model, tokenizer, rows: list[dict], max_seq_len: int, max_new_tokens: int) -> _EvalRuns:
    examples = [tokenize_example(tokenizer, r["messages"], max_seq_len, r.get("tools")) for r in rows]
    prompts = [render(tokenizer, r["messages"][:-1], r.get("tools"), add_generation_prompt=True) for r in rows]
    with model.disable_adapter():
        base_sums, counts = _row_losses(model, examples, tokenizer.pad_token_id)
        base_out = _generate(model, tokenizer, prompts, max_new_tokens, "base")
    ad_sums, _ = _row_losses(model, examples, tokenizer.pad_token_id)
    ad_out = _generate(model, tokenizer, prompts, max_new_tokens, "adapter")
    return _EvalRuns(
        prompts=prompts,
        references=[reference_text(r["messages"][-1]) for r in rows],
        base_sums=base_sums,
        adapter_sums=ad_sums,
        counts=counts,
        base_outputs=base_out,
        adapter_outputs=ad_out,
    )


def _answer_scores(runs: _EvalRuns) -> dict[str, tuple[list[float], list[float]]]:
    """Per-row scores of the base's and the adapter's answers on every answer metric of the metric table (exact
    match, contains, chrF; see metric_table)."""

    def scores(metric: Metric, outs: list[str]) -> list[float]:
        return [metric.score_answer(o, r) for o, r in zip(outs, runs.references, strict=True)]

    return {m.name: (scores(m, runs.base_outputs), scores(m, runs.adapter_outputs)) for m in ANSWER_METRICS}


def _samples(rows: list[dict], runs: _EvalRuns, n: int = 10) -> list[dict]:
    return [
        {"prompt": r["messages"][-2]["content"], "reference": ref, "base": b, "adapter": a}
        for r, ref, b, a in list(zip(rows, runs.references, runs.base_outputs, runs.adapter_outputs, strict=True))[:n]
    ]


def _trained_method(adapter_dir: Path) -> str:
    """`lora` or `qlora`, from the training manifest (`lora` for an adapter trained elsewhere)."""
    manifest_path = adapter_dir / "training_manifest.json"
    return json.loads(manifest_path.read_text())["method"]["method"] if manifest_path.exists() else "lora"


def _release_model_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_eval(adapter_dir: Path) -> EvalResult:
    path = Path(adapter_dir) / EVAL_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the adapter has not been evaluated. Fix: materialize its eval asset first."
        )
    return EvalResult.model_validate(json.loads(path.read_text()))
