"""One-epoch LoRA / QLoRA training with transformers' Trainer and peft, in phases: preflight (nothing loaded or
tokenized yet), tokenize (:mod:`lora_assets.batching`), load the base and wrap it with LoRA
(:mod:`lora_assets.methods`), fit, write.

The result is a standard peft adapter dir (``adapter_config.json`` + ``adapter_model.safetensors``) plus
``training_manifest.json`` with the resolved config, the base model's content hash, the dataset fingerprint,
library versions, metrics and timings. Loss is computed on assistant tokens only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lora_assets.architectures import architecture_warning, resolve_target_modules, target_module_problems
from lora_assets.base_model import BaseModelRef
from lora_assets.batching import PackingCollator, PaddedCollator, attention_width, tokenized_train_split
from lora_assets.clean import CleanReport
from lora_assets.data_parallel import (
    CollatorWithExampleIds,
    DataParallel,
    ExampleRecorder,
    main_first,
    manifest_record,
    rank_dataset,
)
from lora_assets.hardware import compute_record, resolve_dtype, torch_dtype
from lora_assets.home import Home
from lora_assets.methods import INIT_VARIANTS, MethodChoice, choose_method, load_nf4_base, lora_config
from lora_assets.plot import loss_curve_png
from lora_assets.progress import listening as progress_listening
from lora_assets.progress import report as report_progress
from lora_assets.spec import AdapterSpec
from lora_assets.train_kernels import supervised_lm_loss, use_bits_dropout

log = logging.getLogger(__name__)

TRAINER_VERSION = 6
#: Where the initial PiSSA/OLoRA adapter waits, inside the run's tmp dir, for the conversion at save.
INITIAL_ADAPTER = "initial_adapter"
#: Spec fields that do not change the trained weights (left out of the run key and the train code version)
RUN_KEY_EXCLUDE = {"gate", "sweep", "max_eval_rows", "checkpoint_every", "promote"}
LOSS_PLOT = "loss_curve.png"  # kept next to the adapter weights; the train asset shows it in the UI


class TrainResult(BaseModel):
    """What training wrote and measured (also stored as ``result`` in ``training_manifest.json``)."""

    model_config = ConfigDict(extra="forbid")

    adapter_dir: str = Field(description="The published peft adapter dir, ``<adapters>/<job key>/<run key>``.")
    method: str = Field(description="`lora` or `qlora`, as resolved by choose_method.")
    method_reason: str = Field(description="Why that method (see MethodChoice.reason).")
    reused: bool = Field(description="True when a finished run of the same run key was returned, not retrained.")
    train_loss: float = Field(description="The Trainer's mean training loss over the steps this process ran.")
    steps: int = Field(description="Optimizer steps at the end of training (including any before a resume).")
    examples: int = Field(description="Train examples with at least one assistant token (the rest carry no loss).")
    tokens: int = Field(description="Real tokens in those examples, before packing or padding.")
    tokens_per_s: float = Field(description="Real tokens trained per second of wall time in this process.")
    wall_s: float = Field(description="Seconds spent in the Trainer's fit in this process.")
    trainable_params: int = Field(description="Parameters LoRA trains.")
    total_params: int = Field(description="All parameters of the wrapped model, as peft counts them.")
    loss_curve: list[tuple[int, float]] = Field(description="(step, training loss) at every logged step.")
    peak_memory_bytes: int = Field(0, description="Peak memory during training; see peak_memory_kind.")
    peak_memory_kind: str = Field(
        "", description="What peak_memory_bytes measures: CUDA's peak allocation, or the process's sampled RSS."
    )


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only) so the RSS-based peak on CPU measures live memory, not
    what loading the model left behind (a 4-bit load reads the bf16 weights first)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak includes the allocator's slack
        pass


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def make_progress_callback(job_key: str, collator, say, log_every: int):
    """A Trainer callback that reports every step to :mod:`lora_assets.progress` (the CLI's bar), drives a tqdm bar
    when nothing listens there and stderr is a terminal, sends a log line every ``log_every`` steps to ``say``
    (Dagster's logger in assets), and tracks peak memory: the accelerator's peak allocation, or on CPU the
    process's peak resident set sampled every step."""
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.bar = None
            self.loss = float("nan")
            self.t0 = time.perf_counter()
            self.tokens0 = 0
            self.peak_rss = _rss_bytes()

        def tokens_per_s(self) -> float:
            return (collator.real_tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0, self.tokens0 = time.perf_counter(), collator.real_tokens
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=job_key,
                unit="step",
                disable=progress_listening() or not os.isatty(2),
                dynamic_ncols=True,
            )

        def on_step_end(self, args, state, control, **kw):
            self.peak_rss = max(self.peak_rss, _rss_bytes())
            report_progress(
                "training", state.global_step, state.max_steps, loss=self.loss, tokens_per_s=self.tokens_per_s()
            )
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{self.loss:.4f}", tok_s=f"{self.tokens_per_s():.0f}", refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                say(
                    f"{job_key}: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"{self.tokens_per_s():.0f} tok/s"
                )

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        def peak_memory(self) -> tuple[int, str]:
            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
            return self.peak_rss, "process RSS (sampled each step)"

    return _Progress()


def make_trainer(recorder: ExampleRecorder | None = None, **kwargs):
    """A transformers ``Trainer`` whose loss runs the LM head only at labelled positions.

    Same loss and gradients as the model's own (tested), without logits for the prompt tokens; see
    :func:`lora_assets.train_kernels.supervised_lm_loss`. Models whose head it cannot handle use their own loss.
    Batches may carry ``example_ids`` (data-parallel runs): they are taken off before the forward pass and, with a
    ``recorder``, recorded under the optimizer step they belong to.
    """
    from transformers import Trainer

    class SupervisedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs.pop("example_ids", None)
            if recorder is not None and ids is not None:
                recorder.record(self.state.global_step, ids.tolist())
            out = None if return_outputs else supervised_lm_loss(model, inputs)
            if out is None:
                self.loss_is_scaled_for_ga = None  # the model's own loss: the Trainer's default handling
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            total, count = out
            # Normalized over the whole accumulated batch when the Trainer counted it, else over this micro-batch
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
            return total / denominator

    return SupervisedLossTrainer(**kwargs)


def run_config(spec: AdapterSpec) -> dict:
    """The settings that determine the trained weights (a plain-LoRA, one-process spec keys as it did before
    `variant` and `processes` existed, so its finished runs are reused)."""
    config = spec.model_dump(mode="json", exclude=RUN_KEY_EXCLUDE)
    if config.get("variant") == "lora":
        del config["variant"]
    if config.get("processes") == 1:  # likewise `processes`; more than one orders the epoch differently
        del config["processes"]
    return config


def run_key(spec: AdapterSpec, base: BaseModelRef, clean: CleanReport) -> str:
    """Content key of one training run: same base, data and config give the same adapter dir."""
    payload = {
        "spec": run_config(spec),
        "base": base.content_hash,
        "data": clean.fingerprint,
        "trainer": TRAINER_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _load_base_for_training(base: BaseModelRef, method: str):
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                f"method qlora needs bitsandbytes, which cannot load here ({e}). Fix: set "
                "method: lora, or install bitsandbytes for this platform."
            ) from e
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(load_nf4_base(base.path), use_gradient_checkpointing=False)
    # bf16 where the hardware computes in it, else fp32 (see lora_assets.hardware). With bf16, the frozen base is
    # stored in bf16 (half the memory of fp32, and autocast need not cast its weights every step); peft keeps the
    # trainable LoRA weights in fp32.
    return AutoModelForCausalLM.from_pretrained(base.path, dtype=torch_dtype("auto"))


def preflight(field: str, spec: AdapterSpec, base: BaseModelRef) -> list[str]:
    """Problems that would only show once training starts, found before any weights load.

    Args:
        field: the spec path of this adapter, e.g. ``adapters.capitals``, used in the messages.
        spec: the adapter's settings.
        base: the resolved base model.
    """
    problems = target_module_problems(f"{field}.target_modules", spec.target_modules, base.id, base.path)
    if spec.method == "qlora" or (spec.sweep and "qlora" in spec.sweep.get("method", [])):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means QLoRA cannot run here
            problems.append(
                f"{field}.method: qlora needs bitsandbytes, which cannot load here ({e}). Fix: use "
                "method: lora (or auto), or install bitsandbytes for this platform."
            )
    if spec.variant in INIT_VARIANTS and spec.method == "auto" and choose_method(spec, base).method == "qlora":
        problems.append(
            f"{field}.variant: {spec.variant} needs the base in full precision, but method auto picks qlora for "
            f"{base.id} on this machine (it does not fit in bf16). Fix: use variant lora, rslora or dora."
        )
    return problems


def training_warnings(spec: AdapterSpec, n_examples: int, base: BaseModelRef | None = None) -> list[str]:
    """Advice that does not stop training: unusual alpha/r, a rank large for the data, a base of a family not
    tested with vLLM's LoRA serving."""
    arch_advice = architecture_warning(base.config, base.id) if base is not None else None
    warnings = [arch_advice] if arch_advice else []
    ratio = spec.alpha / spec.r
    if not 0.5 <= ratio <= 4:
        warnings.append(
            f"lora_alpha/r = {spec.alpha}/{spec.r} = {ratio:g} is far from the usual 1-2: the update is "
            "scaled by alpha/r, so this acts like a learning rate "
            f"{'far smaller' if ratio < 0.5 else 'far larger'} than the one set."
        )
    if spec.r >= 64 and n_examples < 2000:
        warnings.append(
            f"r={spec.r} with only {n_examples} training examples: a high rank adds capacity the data "
            "cannot fill and tends to overfit; r=8-16 is usually enough below a few thousand examples."
        )
    return warnings


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _is_complete(checkpoint: Path) -> bool:
    # The Trainer writes trainer_state.json last, after the weights, optimizer, scheduler and RNG states: a
    # checkpoint without a readable one was cut off mid-save (e.g. by SIGKILL).
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def latest_complete_checkpoint(root: Path) -> Path | None:
    """The newest Trainer checkpoint under ``root`` that finished saving, or None. Reads only."""
    if not root.is_dir():
        return None
    return max((d for d in root.glob("checkpoint-*") if _is_complete(d)), key=_checkpoint_step, default=None)


def default_checkpoint_every(steps_per_epoch: int) -> int:
    """A tenth of the epoch, and at least 25 steps apart: each checkpoint writes the adapter, the optimizer and
    RNG states (3.5% of a 24-step SmolLM2 epoch when saved every 2 steps), and a short epoch is cheap to redo."""
    return max(25, steps_per_epoch // 10)


def train_adapter(
    job_key: str,
    spec: AdapterSpec,
    base: BaseModelRef,
    clean: CleanReport,
    home: Home,
    log_every: int = 10,
    progress=None,
    data_parallel: DataParallel | None = None,
) -> TrainResult:
    """Train one adapter for exactly one epoch over the dataset's train split.

    Phases: reuse a finished run of the same run key; check the settings (nothing loaded or tokenized yet);
    tokenize the train split; load the base and wrap it with LoRA; fit (resuming an interrupted run); write the
    adapter, loss plot and manifest beside the final dir and rename it into place.

    Args:
        job_key: the adapter job's key: the adapter name, or ``<name>.p<i>`` for a sweep point (see
            :func:`lora_assets.pipeline.adapter_jobs`); names the output dir, log lines and the manifest.
        spec: the adapter's settings.
        base: the resolved base model.
        clean: the cleaning report of the adapter's dataset (gives the train split and fingerprint).
        home: the home dir's layout: output goes to ``<home>/adapters/<job_key>/<run key>``, the tokenized train
            split to the token cache ``<home>/tokenized``.
        log_every: log the loss every this many steps.
        progress: optional callable(str) that receives the log lines (Dagster's logger in assets).
        data_parallel: this process's place in a data-parallel run (:mod:`lora_assets.distributed` starts one per
            process under torchrun); None trains in this process alone. Every rank trains its share of each batch
            (see :mod:`lora_assets.data_parallel`); rank 0 alone writes the run dir and publishes the adapter.
    """
    dp = data_parallel
    out_dir = home.adapters / job_key / run_key(spec, base, clean)
    reused = _finished_run(out_dir)
    if reused is not None:
        return reused
    problems = preflight(f"adapters.{job_key}", spec, base)
    if problems:
        raise ValueError("; ".join(problems))
    choice = choose_method(spec, base)

    import torch

    torch.manual_seed(spec.seed)
    say = progress or log.info
    with main_first(dp):  # rank 0 tokenizes into the cache, the others read it
        data = _tokenized_data(spec, base, clean, home.tokenized)
    warnings = _announce_warnings(job_key, spec, base, len(data.examples), progress)
    model, trainable, total = _lora_model(spec, base, choice.method)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fit = _fit(job_key, spec, base, model, data, tmp, log_every, say, dp)
    result = _train_result(out_dir, choice, data, fit, int(trainable), int(total))
    if dp is not None and not dp.is_main:
        return result
    manifest = _manifest(job_key, spec, base, clean, choice, data, fit, warnings, result)
    manifest["data_parallel"] = manifest_record(dp, spec.batch_size, fit.padding_examples)
    _publish(tmp, out_dir, job_key, fit, manifest)
    return result


def _publish(tmp: Path, out_dir: Path, job_key: str, fit: _FitOutcome, manifest: dict) -> None:
    """Write the loss plot and the manifest into the run dir and rename it into place."""
    (tmp / LOSS_PLOT).write_bytes(loss_curve_png(fit.curve, f"{job_key}: training loss (one epoch)"))
    (tmp / "training_manifest.json").write_text(json.dumps(manifest, indent=2))  # published by the rename below
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # the adapter dir appears complete or not at all


def _finished_run(out_dir: Path) -> TrainResult | None:
    """The result of a run that already published ``out_dir`` (same run key), marked reused; else None."""
    manifest_path = out_dir / "training_manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    return TrainResult(**{**manifest["result"], "reused": True})


@dataclass
class _TrainData:
    """The tokenized train split and the tokenizer that made it."""

    tokenizer: Any
    examples: list[dict]
    tokens: int  # real tokens in the split (before packing or padding)
    cache_hit: bool  # whether the split came from the tokenized cache


def _tokenized_data(spec: AdapterSpec, base: BaseModelRef, clean: CleanReport, cache_dir: Path) -> _TrainData:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, cache_hit = tokenized_train_split(tokenizer, base, clean, spec.max_seq_len, cache_dir)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    for e in examples:
        e["length"] = len(e["input_ids"])  # for the length-grouped sampler (the collators ignore it)
    return _TrainData(tokenizer=tokenizer, examples=examples, tokens=n_tokens, cache_hit=cache_hit)


def _announce_warnings(job_key: str, spec: AdapterSpec, base: BaseModelRef, n_examples: int, progress) -> list[str]:
    """Log :func:`training_warnings` (and send them to ``progress``); returns them for the manifest."""
    warnings = training_warnings(spec, n_examples, base)
    for w in warnings:
        log.warning("%s: %s", job_key, w)
        if progress:
            progress(f"{job_key}: warning: {w}")
    return warnings


def _lora_model(spec: AdapterSpec, base: BaseModelRef, method: str):
    """The base loaded for ``method`` and wrapped with fresh LoRA weights; returns (model, trainable, total)."""
    import torch
    from peft import get_peft_model

    model = _load_base_for_training(base, method)
    _release_freed_memory()
    # No KV cache in training: with one, transformers also skips the packed-sequence mask (see PackingCollator)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(spec, base))
    trainable, total = model.get_nb_trainable_parameters()
    if not torch.cuda.is_available():
        use_bits_dropout(model)  # same dropout, ~3x cheaper masks on CPU (see lora_assets.train_kernels)
    return model, trainable, total


def _save_adapter(model, spec: AdapterSpec, out: Path) -> None:
    """Save the trained adapter. A PiSSA/OLoRA one is saved converted (peft's weight conversion against the
    initial adapter) to a plain LoRA of rank 2r on the unchanged base, so it loads and serves like any LoRA."""
    if spec.variant in INIT_VARIANTS:
        initial = out / INITIAL_ADAPTER
        model.save_pretrained(out, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial))
        shutil.rmtree(initial)
    else:
        model.save_pretrained(out, safe_serialization=True)


@dataclass
class _FitOutcome:
    """What one fit measured, for the result and the manifest."""

    train_loss: float
    steps: int  # the Trainer's global step at the end (counts steps done before a resume)
    steps_per_epoch: int
    start_step: int  # the checkpoint step this process resumed from, 0 for a fresh run
    save_every: int
    wall_s: float
    curve: list[tuple[int, float]]
    peak_memory: tuple[int, str]
    padding_fraction: float | None
    padding_examples: int = 0  # data-parallel only: pad-token examples that fill the last batch (no loss)


def _resume_point(tmp: Path, job_key: str, say) -> Path | None:
    """The checkpoint to resume from in the run dir ``tmp``, which survives a crash; clears what cannot be used."""
    resume_from = latest_complete_checkpoint(tmp / "checkpoints")
    if resume_from is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    for d in (tmp / "checkpoints").glob("checkpoint-*"):  # cut off mid-save: never resume from those
        if not _is_complete(d):
            shutil.rmtree(d, ignore_errors=True)
    say(f"{job_key}: resuming from {resume_from.name} of an interrupted run")
    return resume_from


def _training_arguments(
    spec: AdapterSpec, tmp: Path, save_every: int, steps_per_epoch: int, log_every: int, dp: DataParallel | None = None
):
    import torch
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(tmp / "checkpoints"),
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=2,
        num_train_epochs=1,
        max_steps=spec.max_steps or -1,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=int(spec.warmup_ratio * steps_per_epoch),
        logging_steps=log_every,
        report_to="none",
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=resolve_dtype("auto") == "bfloat16",  # autocast in the format the base was loaded in
        use_cpu=not torch.cuda.is_available(),
        # Batches of similar lengths (transformers' LengthGroupedSampler: each example once per epoch, in
        # length-sorted groups of 50 batches, shuffled by the seed): rows pack with little padding.
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,  # our own bar, see make_progress_callback
    )
    return TrainingArguments(**settings | (dp.training_arguments(spec.batch_size) if dp else {}))


def _fit(
    job_key: str,
    spec: AdapterSpec,
    base: BaseModelRef,
    model,
    data: _TrainData,
    tmp: Path,
    log_every: int,
    say,
    dp: DataParallel | None = None,
) -> _FitOutcome:
    """One epoch with the Trainer in the run dir ``tmp`` (resuming its last complete checkpoint), then the
    adapter weights saved into ``tmp`` and the checkpoints removed (by rank 0 of a data-parallel run)."""
    from transformers import PrinterCallback

    steps_per_epoch = math.ceil(len(data.examples) / (spec.batch_size * spec.gradient_accumulation_steps))
    with main_first(dp):  # rank 0 clears what cannot be resumed; then every rank finds the same checkpoint
        resume_from = _resume_point(tmp, job_key, say) if dp is None or dp.is_main else _latest(tmp)
        if spec.variant in INIT_VARIANTS and not (tmp / INITIAL_ADAPTER).exists() and (dp is None or dp.is_main):
            # PiSSA/OLoRA moved part of the base into the adapter: keep that starting point (the model is still at
            # its deterministic init here, a resumed run included) to convert against when saving
            model.save_pretrained(tmp / INITIAL_ADAPTER, safe_serialization=True)
    save_every = spec.checkpoint_every or default_checkpoint_every(steps_per_epoch)
    args = _training_arguments(spec, tmp, save_every, steps_per_epoch, log_every, dp)
    collator = (
        PackingCollator(data.tokenizer.pad_token_id, spec.max_seq_len, attention_width(base.config))
        if spec.packing
        else PaddedCollator(data.tokenizer)
    )
    dataset, padding = _train_dataset(spec, data, dp)
    progress_cb = make_progress_callback(job_key, collator, say, log_every)
    trainer = make_trainer(
        recorder=ExampleRecorder.from_env(dp.rank) if dp else None,
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CollatorWithExampleIds(collator) if dp else collator,
        callbacks=[progress_cb],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; the progress callback says it better
    t0 = time.time()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.time() - t0
    if dp is None or dp.is_main:
        _save_adapter(model, spec, tmp)
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    return _FitOutcome(
        train_loss=float(out.training_loss),
        steps=trainer.state.global_step,
        steps_per_epoch=steps_per_epoch,
        start_step=_checkpoint_step(resume_from) if resume_from else 0,
        save_every=save_every,
        wall_s=wall,
        curve=[(h["step"], round(h["loss"], 5)) for h in trainer.state.log_history if "loss" in h],
        peak_memory=progress_cb.peak_memory(),
        padding_fraction=(round(1 - collator.real_tokens / collator.row_tokens, 4) if collator.row_tokens else None),
        padding_examples=padding,
    )


def _latest(tmp: Path) -> Path | None:
    return latest_complete_checkpoint(tmp / "checkpoints")


def _train_dataset(spec: AdapterSpec, data: _TrainData, dp: DataParallel | None) -> tuple[list[dict], int]:
    """The examples as the Trainer gets them, and how many padding examples they include: the split itself (its
    sampler groups by length), or, data-parallel, the order and shares of :func:`rank_dataset`."""
    if dp is None:
        return data.examples, 0
    return rank_dataset(
        data.examples,
        spec.batch_size,
        spec.gradient_accumulation_steps,
        spec.seed,
        dp.world_size,
        data.tokenizer.pad_token_id,
    )


def _train_result(
    out_dir: Path, choice: MethodChoice, data: _TrainData, fit: _FitOutcome, trainable: int, total: int
) -> TrainResult:
    # Tokens this process trained on: a resumed run only did the steps after its checkpoint, and a smoke run
    # (max_steps) only part of the epoch.
    done = max(0, min(fit.steps, fit.steps_per_epoch) - fit.start_step)
    seen_tokens = data.tokens * done / fit.steps_per_epoch
    return TrainResult(
        adapter_dir=str(out_dir),
        method=choice.method,
        method_reason=choice.reason,
        reused=False,
        train_loss=fit.train_loss,
        steps=fit.steps,
        examples=len(data.examples),
        tokens=data.tokens,
        tokens_per_s=round(seen_tokens / fit.wall_s, 1),
        wall_s=round(fit.wall_s, 2),
        trainable_params=trainable,
        total_params=total,
        loss_curve=fit.curve,
        peak_memory_bytes=fit.peak_memory[0],
        peak_memory_kind=fit.peak_memory[1],
    )


def _manifest(
    job_key: str,
    spec: AdapterSpec,
    base: BaseModelRef,
    clean: CleanReport,
    choice: MethodChoice,
    data: _TrainData,
    fit: _FitOutcome,
    warnings: list[str],
    result: TrainResult,
) -> dict:
    """``training_manifest.json``: what was trained, on what, with which libraries, and the result."""
    return {
        "adapter_name": job_key,
        "config": spec.model_dump(mode="json")
        | {"lora_alpha": spec.alpha, "target_modules": resolve_target_modules(spec.target_modules, base.path)},
        "epochs": 1,
        "max_steps": spec.max_steps,
        "steps_per_epoch": fit.steps_per_epoch,
        "checkpoint_every": fit.save_every,
        "resumed_from_step": fit.start_step or None,
        "warnings": warnings,
        "tokenized_cache": "hit" if data.cache_hit else "miss",
        "packing": spec.packing,
        "padding_fraction": fit.padding_fraction,
        "method": choice.model_dump(),
        "compute": compute_record("auto"),  # the format the base was loaded and autocast in, and where
        "base_model": {"id": base.id, "path": str(base.path), "content_hash": base.content_hash},
        "dataset": {"name": clean.dataset, "fingerprint": clean.fingerprint, "rows_train": clean.rows_train},
        "mixture": [s.model_dump() for s in clean.mixture],  # a weighted mixture's sources; [] for one dataset
        "libraries": _library_versions(),
        "seed": spec.seed,
        "result": result.model_dump(mode="json"),
    }
