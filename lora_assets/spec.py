"""The declarative pipeline spec: pydantic models, loading, and up-front validation.

Every problem in a spec is collected and reported at once, each with its field path, the bad value and the
fix, before any model or dataset is loaded (:func:`load_spec` raises :class:`SpecError`).
"""

from __future__ import annotations

import glob as globlib
import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_assets.base_model import BUILTIN_MODELS

#: The seven linear projections of a Llama-style decoder layer: what `target_modules: all-linear` means there.
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

Metric = Literal["exact_match", "contains", "chrf", "eval_loss", "perplexity"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    """One raw instruction dataset and how to clean and split it."""

    path: str = Field(
        description="A file or a glob (.jsonl, .json array, .csv, .parquet), relative to the spec file's folder."
    )
    format: Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion", "text"] = Field(
        "auto", description="Row format; `auto` detects it per file from the first valid row's keys."
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rows held out for evaluation, chosen by a hash of the content."
    )
    max_tokens: int = Field(
        512,
        gt=0,
        description="Rows longer than this many tokens (chat template applied) are quarantined, never truncated.",
    )
    pii: Literal["redact", "quarantine", "off"] = Field(
        "redact",
        description="E-mail addresses, phone numbers and IPv4 addresses: replace them with <EMAIL>, "
        "<PHONE>, <IPV4> (`redact`), quarantine the row (`quarantine`), or leave them (`off`).",
    )
    near_duplicate_threshold: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="Word-trigram Jaccard similarity (MinHash estimate) at or above which a row "
        "is a near-duplicate of an earlier one and quarantined; null turns the check off.",
    )
    min_train_rows: int = Field(
        1,
        gt=0,
        description="The blocking check on the clean asset fails (and training does not start) when "
        "fewer train rows remain.",
    )


class GateSpec(_Strict):
    """A quality gate: an adapter that fails it is registered as `rejected` and never served."""

    metric: Metric = Field(description="The eval metric the gate reads.")
    min_gain: float | None = Field(
        None,
        description="Adapter must beat the base by at least this much (for eval_loss: lower by at least this much).",
    )
    min_value: float | None = Field(
        None, description="Adapter's metric must reach this value (for eval_loss: at most this value)."
    )

    @model_validator(mode="after")
    def _exactly_one_threshold(self) -> GateSpec:
        if (self.min_gain is None) == (self.min_value is None):
            raise ValueError("set exactly one of min_gain or min_value, e.g. {metric: exact_match, min_gain: 0.1}")
        return self


class AdapterSpec(_Strict):
    """One LoRA adapter: trained for exactly one epoch on one dataset, evaluated, registered, served."""

    dataset: str = Field(description="Name of the dataset (a key under `datasets`) to train on.")
    method: Literal["lora", "qlora", "auto"] = Field(
        "auto",
        description="`lora` (bf16 base), `qlora` (4-bit NF4 base, double quant), or `auto`: QLoRA only "
        "when the bf16 weights and training state do not fit the memory budget.",
    )
    r: int = Field(16, description="LoRA rank.")
    lora_alpha: int | str | None = Field(
        None,
        description="LoRA scaling numerator: an integer, or a multiple of r written `r`, `2r`, `4r` (handy in "
        "sweeps over r); default 2r.",
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get LoRA; `all-linear` means every attention and MLP projection "
        "(for Llama: q, k, v, o, gate, up, down).",
    )
    lora_dropout: float = Field(0.05, description="Dropout on the LoRA input, in [0, 1).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the epoch spent warming up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("cosine", description="Learning-rate schedule.")
    batch_size: int = Field(8, gt=0, description="Examples per optimizer step (per device).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per step.")
    max_seq_len: int = Field(512, gt=0, description="Training sequence length cap in tokens.")
    packing: bool = Field(
        True,
        description="Pack each batch's examples into as few rows of max_seq_len as fit, "
        "instead of padding every example to the longest; examples never attend to each other.",
    )
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Smoke runs only: stop after this many steps "
        "(recorded in the manifest). Omit for the full single epoch.",
    )
    seed: int = Field(0, description="Seed for LoRA init and data order.")
    checkpoint_every: int | None = Field(
        None,
        gt=0,
        description="Save a resumable checkpoint every this many optimizer steps; default about a "
        "tenth of the epoch. A run killed and started again resumes from the last complete one.",
    )
    max_eval_rows: int = Field(200, gt=0, description="Evaluate on at most this many held-out rows.")
    gate: GateSpec | None = Field(
        None,
        description="Optional quality gate, enforced by a blocking asset check; an "
        "adapter that fails it is registered as `rejected` and never served.",
    )
    promote: Literal["if_better", "always", "manual"] = Field(
        "if_better",
        description="When a registered version that passed its gate becomes the `champion` of its "
        "name (the version served under the plain name): `if_better` when it beats the current champion on the "
        "gate's metric (eval_loss without a gate), `always`, or `manual` (`lorafoundry registry promote`).",
    )
    sweep: dict[str, list[Any]] | None = Field(
        None,
        description="Grid over r, lora_alpha, target_modules, learning_rate, method, seed: one adapter version "
        "per point, all registered under this adapter's name.",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("epochs", "num_epochs", "num_train_epochs"):
                if key in data:
                    raise ValueError(
                        f"`{key}` is not a setting: lorafoundry trains exactly one epoch, since repeated passes "
                        "over a small instruction set overfit a LoRA adapter. Remove the key; to train longer, "
                        "add more (or more varied) data."
                    )
        return data

    @field_validator("r")
    @classmethod
    def _r_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("r must be a positive integer. Fix: use a rank such as 8, 16 or 64")
        return v

    @field_validator("lora_alpha")
    @classmethod
    def _alpha_positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str):
            if not re.fullmatch(r"[1-9][0-9]*r|r", v.strip()):
                raise ValueError(
                    f"lora_alpha {v!r} is neither an integer nor a multiple of r. Fix: write e.g. 32, `r` or `2r`"
                )
            return v.strip()
        if v is not None and v <= 0:
            raise ValueError("lora_alpha must be positive. Fix: omit it (default 2r) or set a positive integer")
        return v

    @field_validator("lora_dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("lora_dropout must be in [0, 1). Fix: use a value such as 0.05 (the default) or 0.1")
        return v

    @field_validator("target_modules")
    @classmethod
    def _modules_nonempty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty: list module names such as [q_proj, v_proj] or use `all-linear`")
        return v

    @field_validator("sweep")
    @classmethod
    def _sweep_keys(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if v is None:
            return v
        allowed = {"r", "lora_alpha", "target_modules", "learning_rate", "method", "seed"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"sweep keys {bad} are not sweepable; use some of {sorted(allowed)}")
        empty = sorted(k for k, vals in v.items() if not vals)
        if empty:
            raise ValueError(f"sweep values for {empty} are empty lists: give at least one value")
        return v

    @property
    def alpha(self) -> int:
        """The effective lora_alpha (2 * r unless set; `2r` style values scale with r)."""
        if self.lora_alpha is None:
            return 2 * self.r
        if isinstance(self.lora_alpha, str):
            return int(self.lora_alpha[:-1] or 1) * self.r
        return self.lora_alpha

    def resolved_target_modules(self) -> list[str]:
        """Module names for peft. `all-linear` is spelled out so adapter_config.json names every module."""
        if self.target_modules == "all-linear":
            return list(LLAMA_LINEAR_MODULES)
        return list(self.target_modules)

    def sweep_points(self) -> list[AdapterSpec]:
        """Expand `sweep` into one concrete spec per grid point (the spec itself when there is no sweep)."""
        if not self.sweep:
            return [self]
        keys = sorted(self.sweep)
        points = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            data = self.model_dump(exclude={"sweep"})
            data.update(dict(zip(keys, values, strict=True)))
            points.append(AdapterSpec.model_validate(data))
        return points


class ServingSpec(_Strict):
    """How the vLLM server is started."""

    host: str = Field("127.0.0.1", description="Address vLLM binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of the OpenAI-compatible endpoint.")
    max_loras: int = Field(4, gt=0, description="Adapters that can share one batch (vLLM --max-loras).")
    tensor_parallel_size: int = Field(
        1, gt=0, description="GPUs one server shards the model over (vLLM --tensor-parallel-size); 1 on CPU."
    )
    max_model_len: int = Field(512, gt=0, description="Longest prompt + completion in tokens.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weight dtype vLLM serves (and evaluation uses); `auto`: bfloat16 where the hardware "
        "computes in bf16 natively (CUDA, AVX-512-BF16/AMX CPUs), else float32 (bf16 is ~50x slower there).",
    )
    base_model_name: str | None = Field(
        None, description="Served model name of the base; default derived from `base_model`."
    )
    kv_cache_gib: int = Field(1, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    startup_timeout_s: int = Field(300, gt=0, description="How long to wait for the server to answer.")


class PipelineSpec(_Strict):
    """The whole spec: one base model, its datasets, the adapters to train on them, and serving."""

    base_model: str = Field(
        description="`builtin:tiny` or `builtin:smollm2-135m-instruct` (built offline by "
        "lorafoundry), a local Hugging Face "
        "model dir, or a hub id already in the local HF cache."
    )
    datasets: dict[str, DatasetSpec] = Field(description="Datasets by name.")
    adapters: dict[str, AdapterSpec] = Field(description="Adapters by name; the name is the served model name.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="vLLM server settings.")
    spec_dir: Path = Field(
        Path("."), exclude=True, description="Folder relative paths resolve against (set by load_spec)."
    )

    def dataset_path(self, name: str) -> Path:
        """The dataset's file or glob, made absolute against the spec's folder."""
        p = Path(self.datasets[name].path)
        return p if p.is_absolute() else self.spec_dir.resolve() / p

    @property
    def served_base_name(self) -> str:
        if self.serving.base_model_name:
            return self.serving.base_model_name
        if self.base_model.startswith("builtin:"):
            return "builtin-" + self.base_model.split(":", 1)[1]
        return Path(self.base_model).name or self.base_model


class SpecError(ValueError):
    """A spec with problems. ``problems`` lists each as "field.path: message"."""

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(top level)"


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, str) or "[" not in p)
    path = _loc(loc)
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        parent = _fields_at(model, loc[:-1])
        allowed = f"; allowed keys here: {', '.join(parent)}" if parent else ""
        return f"{path}: unknown key {loc[-1]!r} (value {value!r}){allowed}. Fix: remove it or correct its spelling."
    if err["type"] == "missing":
        return f"{path}: required key is missing. Fix: add `{loc[-1]}`."
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {value!r})."


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` (dict keys are skipped)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # a dict key such as a dataset name
        ann = field.annotation
        for candidate in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
            for inner in getattr(candidate, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    current = inner
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [n for n in current.model_fields if n != "spec_dir"]
    return []


def _cross_checks(raw: dict, spec_dir: Path) -> list[str]:
    """Checks across sections, run on the raw mapping so they add to (not wait for) field errors."""
    problems = []
    datasets = raw.get("datasets") if isinstance(raw.get("datasets"), dict) else {}
    adapters = raw.get("adapters") if isinstance(raw.get("adapters"), dict) else {}
    if isinstance(raw.get("datasets"), dict) and not datasets:
        problems.append("datasets: no dataset declared. Fix: add at least one, e.g. `mydata: {path: data.jsonl}`.")
    if isinstance(raw.get("adapters"), dict) and not adapters:
        problems.append("adapters: no adapter declared. Fix: add at least one, e.g. `mine: {dataset: mydata}`.")
    for section, names in (("datasets", datasets), ("adapters", adapters)):
        for name in names:
            if not _NAME_RE.match(str(name)):
                problems.append(
                    f"{section}.{name}: name {name!r} is not allowed. Fix: use 1-64 characters from "
                    "letters, digits, '.', '_', '-', starting with a letter or digit."
                )
    for name, ds in datasets.items():
        if isinstance(ds, dict) and isinstance(ds.get("path"), str):
            p = Path(ds["path"])
            p = p if p.is_absolute() else spec_dir / p
            is_glob = any(ch in ds["path"] for ch in "*?[")
            if is_glob and not any(Path(f).is_file() for f in globlib.glob(str(p), recursive=True)):
                problems.append(
                    f"datasets.{name}.path: the glob {ds['path']!r} matches no file (looked in "
                    f"{p.parent}). Fix: correct the pattern, relative to the spec file."
                )
            elif not is_glob and not p.is_file():
                problems.append(
                    f"datasets.{name}.path: file {ds['path']!r} does not exist (looked at {p}). "
                    "Fix: give a path relative to the spec file or an absolute path."
                )
    for name, ad in adapters.items():
        if isinstance(ad, dict) and isinstance(ad.get("dataset"), str) and ad["dataset"] not in datasets:
            problems.append(
                f"adapters.{name}.dataset: {ad['dataset']!r} is not a declared dataset. Fix: use one "
                f"of {sorted(datasets)} or declare it under `datasets`."
            )
    base = raw.get("base_model")
    if isinstance(base, str):
        if base.startswith("builtin:") and base.split(":", 1)[1] not in BUILTIN_MODELS:
            names = ", ".join(f"`builtin:{n}`" for n in BUILTIN_MODELS)
            problems.append(
                f"base_model: {base!r} is not a built-in model. Fix: use one of {names}, a local "
                "model dir, or a hub id in your local HF cache."
            )
        elif not base.startswith("builtin:"):
            local = Path(base) if Path(base).is_absolute() else spec_dir / base
            looks_local = base.startswith((".", "/", "~")) or local.exists()
            if looks_local and not (local / "config.json").exists():
                problems.append(
                    f"base_model: {base!r} is not a Hugging Face model dir (no config.json in "
                    f"{local}). Fix: point it at a dir written by save_pretrained."
                )
    return problems


def validate_spec(raw: Any, spec_dir: Path = Path("."), source: str = "spec") -> PipelineSpec:
    """Validate a raw mapping; raise :class:`SpecError` listing every problem at once."""
    if not isinstance(raw, dict):
        raise SpecError(
            [f"(top level): expected a mapping with base_model, datasets, adapters; got {type(raw).__name__}."], source
        )
    problems = _cross_checks(raw, spec_dir)
    spec = None
    try:
        spec = PipelineSpec.model_validate({**raw, "spec_dir": spec_dir})
    except ValidationError as e:
        problems = [_describe(err, PipelineSpec) for err in e.errors()] + problems
    if problems:
        raise SpecError(problems, source)
    assert spec is not None
    return spec


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec file. Raises :class:`SpecError` (every problem at once)."""
    path = Path(path)
    if not path.exists():
        raise SpecError(
            [f"spec file {str(path)!r} does not exist. Fix: pass the path of a YAML spec, e.g. examples/demo.yaml."],
            str(path),
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpecError([f"(file): not valid YAML: {e}"], str(path)) from e
    return validate_spec(raw, path.resolve().parent, str(path))
