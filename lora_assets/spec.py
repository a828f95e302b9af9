"""The declarative pipeline spec: pydantic models, loading, and up-front validation.

Every problem in a spec is collected and reported at once, each with its field path, the bad value and the
fix, before any model or dataset is loaded (:func:`load_spec` raises :class:`SpecError`).
"""

from __future__ import annotations

import itertools
import math
import re
import reprlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lora_assets.base_model import BUILTIN_MODELS
from lora_assets.files import GlobTooBroadError, cut, glob_files, has_magic, is_dir, is_file, unopenable
from lora_assets.methods import INIT_VARIANTS
from registry.metrics import METRIC_NAMES
from registry.rules import is_valid_name  # the name rule is the registry's: adapters are registered by name

#: A metric's name: one of the metric table's (``registry.metrics``), in its order.
MetricName = Literal[METRIC_NAMES]

#: vLLM's largest --max-lora-rank (the last of serving.launch.VLLM_LORA_RANKS): a larger r could never be served.
MAX_LORA_RANK = 512
#: The largest lora_alpha, as an integer (16 * MAX_LORA_RANK) and as a multiple of r (`16r`).
MAX_LORA_ALPHA = 16 * MAX_LORA_RANK
MAX_ALPHA_MULTIPLE = 16
#: The longest token count any length field takes (2**20): far beyond the context of any model served here.
MAX_TOKENS = 1_048_576
#: Steps, rows: counts that large are typos (or `1e26`), never a run that could finish.
MAX_STEPS = 10_000_000
MAX_ROWS = 100_000_000
#: Data-parallel processes one adapter may train with (8 GPUs on each of 128 nodes).
MAX_PROCESSES = 1024
#: Grid points one sweep may expand to; each is a full training run.
MAX_SWEEP_POINTS = 1024
#: Values that all aliases (`*name`) in one spec file may expand to together: a kilobyte of nested anchors
#: otherwise expands to billions of values, and reading the file alone takes all memory.
MAX_ALIAS_VALUES = 1000
#: Deepest nesting a spec file may have (a real spec is about five levels deep); deeper, YAML's reader recurses
#: past Python's stack.
MAX_YAML_DEPTH = 32
#: Characters of a spec file that PyYAML's own scanner reads (a real spec is a few KiB); a larger file, such as one
#: holding a 50 MiB path, is scanned by libyaml (deeper than 1,000 levels, its own nesting error is reported).
MAX_PYTHON_YAML_CHARS = 1 << 20


class _Strict(BaseModel):
    # Infinity and NaN are never a setting: `learning_rate: .inf` would train with lr=inf.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
        le=MAX_TOKENS,
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
        le=MAX_ROWS,
        description="The blocking check on the clean asset fails (and training does not start) when "
        "fewer train rows remain.",
    )
    min_eval_rows: int = Field(
        1,
        gt=0,
        le=MAX_ROWS,
        description="The blocking check on the clean asset fails (and training does not start) when "
        "fewer eval rows remain: evaluation after training needs at least one.",
    )


class GateSpec(_Strict):
    """A quality gate: an adapter that fails it is registered as `rejected` and never served."""

    metric: MetricName = Field(description="The eval metric the gate reads.")
    min_gain: float | None = Field(
        None,
        ge=-1e6,
        le=1e6,
        description="Adapter must beat the base by at least this much (for eval_loss: lower by at least this much).",
    )
    min_value: float | None = Field(
        None, ge=-1e6, le=1e6, description="Adapter's metric must reach this value (for eval_loss: at most this value)."
    )
    confidence: float | None = Field(
        None,
        ge=0.5,
        le=0.999,
        description="Decide on evidence: pass only when this confidence's paired bootstrap interval clears the "
        "threshold (its lower bound reaches min_gain, or the adapter's value's bound reaches min_value), e.g. "
        "0.95; unset: the point estimate decides.",
    )

    @model_validator(mode="after")
    def _exactly_one_threshold(self) -> GateSpec:
        if (self.min_gain is None) == (self.min_value is None):
            raise ValueError("set exactly one of min_gain or min_value, e.g. {metric: exact_match, min_gain: 0.1}")
        return self


class AdapterSpec(_Strict):
    """One LoRA adapter: trained for exactly one epoch on one dataset or a weighted mixture, evaluated, registered,
    served."""

    dataset: str | None = Field(
        None, description="Name of the dataset (a key under `datasets`) to train on; or set `datasets` instead."
    )
    datasets: dict[str, float] | None = Field(
        None,
        examples=[{"support": 0.7, "faq": 0.3}],
        description="A weighted mixture instead of one `dataset`: dataset name -> weight (positive; normalized to "
        "sum 1). Each source contributes rows in proportion to its weight, as many as fit without repeating a row "
        "(the scarcest source, relative to its weight, is used in full); each selected row trains once.",
    )
    method: Literal["lora", "qlora", "auto"] = Field(
        "auto",
        description="`lora` (bf16 base), `qlora` (4-bit NF4 base, double quant), or `auto`: QLoRA only "
        "when the bf16 weights and training state do not fit the memory budget.",
    )
    r: int = Field(
        16,
        ge=1,
        le=MAX_LORA_RANK,
        examples=[8, 16, 64],
        description=f"LoRA rank, 1 to {MAX_LORA_RANK} (vLLM's largest --max-lora-rank).",
    )
    lora_alpha: int | str | None = Field(
        None,
        description=f"LoRA scaling numerator: an integer up to {MAX_LORA_ALPHA}, or a multiple of r written `r`, "
        f"`2r`, ... `{MAX_ALPHA_MULTIPLE}r` (handy in sweeps over r); default 2r.",
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get LoRA; `all-linear` means every linear layer of the decoder blocks, read "
        "from the base itself (Llama: q/k/v/o/gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj) "
        "and written out by name in adapter_config.json; a list names them (checked against the base).",
    )
    lora_dropout: float = Field(0.05, description="Dropout on the LoRA input, in [0, 1).")
    variant: Literal["lora", "rslora", "dora", "pissa", "olora"] = Field(
        "lora",
        description="The LoRA variant: `lora` (plain, scaled alpha/r); `rslora` (scaled alpha/sqrt(r), steadier at "
        "high r; vLLM serves it); `dora` (weight-decomposed; trains and evaluates, but vLLM's multi-LoRA server "
        "cannot serve it: export it merged, `lorafoundry registry export-merged`); `pissa` / `olora` (initialised "
        "from the base's SVD / QR; saved converted to a plain LoRA of rank 2r on the unchanged base, so it serves "
        "like one; method lora only).",
    )
    learning_rate: float = Field(
        2e-4, gt=0, le=1, examples=[2e-4, 1e-3], description="Peak learning rate (AdamW), above 0 and at most 1."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the epoch spent warming up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("cosine", description="Learning-rate schedule.")
    batch_size: int = Field(
        8,
        gt=0,
        le=4096,
        description="Examples per optimizer step; with several `processes`, all of them together (each takes "
        "batch_size / processes).",
    )
    gradient_accumulation_steps: int = Field(1, gt=0, le=1024, description="Micro-batches accumulated per step.")
    max_seq_len: int = Field(512, gt=0, le=MAX_TOKENS, description="Training sequence length cap in tokens.")
    packing: bool = Field(
        True,
        description="Pack each batch's examples into as few rows of max_seq_len as fit, "
        "instead of padding every example to the longest; examples never attend to each other.",
    )
    processes: int = Field(
        1,
        ge=1,
        le=MAX_PROCESSES,
        description="Data-parallel training processes: more than 1 makes the train asset start `torchrun "
        "--nproc-per-node N` (through Dagster Pipes; one process per GPU, nccl on GPUs, gloo on CPU). Each process "
        "trains batch_size / processes examples of every step, so the steps, the global batches and the schedule "
        "are those of one process and each example is still seen once per epoch. 1 trains in the step's process.",
    )
    max_steps: int | None = Field(
        None,
        gt=0,
        le=MAX_STEPS,
        description="Smoke runs only: stop after this many steps "
        "(recorded in the manifest). Omit for the full single epoch.",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for LoRA init and data order (0 to 2**32 - 1).")
    checkpoint_every: int | None = Field(
        None,
        gt=0,
        le=MAX_STEPS,
        description="Save a resumable checkpoint every this many optimizer steps; default about a "
        "tenth of the epoch. A run killed and started again resumes from the last complete one.",
    )
    max_eval_rows: int = Field(200, gt=0, le=MAX_ROWS, description="Evaluate on at most this many held-out rows.")
    gate: GateSpec | None = Field(
        None,
        description="Optional quality gate, enforced by a blocking asset check; an "
        "adapter that fails it is registered as `rejected` and never served.",
    )
    promote: Literal["if_better", "if_significantly_better", "always", "manual"] = Field(
        "if_better",
        description="When a registered version that passed its gate becomes the `champion` of its "
        "name (the version served under the plain name): `if_better` when it beats the current champion on the "
        "gate's metric (eval_loss without a gate); `if_significantly_better` when it wins on that metric paired "
        "with the champion on the same held-out rows, the bootstrap interval of the difference (at the gate's "
        "confidence, else 95%) above zero; `always`; or `manual` (`lorafoundry registry promote`).",
    )
    # The last field: its validator sees every other field's validated value (``info.data``) to check grid points.
    sweep: dict[str, list[Any]] | None = Field(
        None,
        description="Grid over r, lora_alpha, target_modules, learning_rate, method, seed, variant: one adapter "
        "version per point, all registered under this adapter's name.",
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

    @model_validator(mode="after")
    def _one_data_source(self) -> AdapterSpec:
        if (self.dataset is None) == (self.datasets is None):
            raise ValueError(
                "set exactly one of `dataset` (a name) or `datasets` (a mixture, name -> weight), e.g. "
                "`dataset: faq` or `datasets: {support: 0.7, faq: 0.3}`"
            )
        for name, weight in (self.datasets or {}).items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"datasets.{_key(name)}: weight {weight!r} must be a positive number. Fix: e.g. 0.3, or remove "
                    "the source"
                )
        if self.datasets == {}:
            raise ValueError("datasets is empty. Fix: name at least one dataset with its weight, or use `dataset`")
        return self

    def sources(self) -> dict[str, float]:
        """The datasets this adapter trains on, with their weights normalized to sum 1 (one dataset: weight 1)."""
        if self.datasets is None:
            return {self.dataset: 1.0}
        total = sum(self.datasets.values())
        return {name: w / total for name, w in self.datasets.items()}

    def data_name(self) -> str:
        """What it was trained on, in words: the dataset's name, or the mixture's sources joined by `+`."""
        return self.dataset if self.datasets is None else "+".join(self.datasets)

    @model_validator(mode="after")
    def _settings_fit_together(self) -> AdapterSpec:
        """Settings valid alone but not together, every one collected. A sweep's grid points, not this entry's own
        values of the swept keys, are what trains: the sweep's validator checks each point as a whole adapter."""
        problems = [] if self.sweep else self._combination_problems()
        if problems:
            raise PydanticCustomError(
                "adapter_problems", "{summary}", {"summary": "; ".join(problems), "problems": problems}
            )
        return self

    def _combination_problems(self) -> list[str]:
        """The cross-field problems of one concrete adapter (no sweep)."""
        problems = []
        if self.variant in INIT_VARIANTS and self.method == "qlora":
            problems.append(
                f"variant {self.variant} initialises the adapter from the base's full-precision weights and is "
                "converted against them when saved; with a 4-bit base the converted adapter would not match. "
                "Fix: use method lora, or variant lora/rslora/dora with qlora."
            )
        if self.batch_size % self.processes:
            lower = self.batch_size - self.batch_size % self.processes
            fixes = [f"batch_size {n}" for n in (lower, lower + self.processes) if n > 0]
            problems.append(
                f"batch_size {self.batch_size} does not split evenly over processes {self.processes}: each process "
                f"trains batch_size / processes examples of every step. Fix: set {' or '.join(fixes)}, or change "
                "processes."
            )
        return problems

    @field_validator("lora_alpha")
    @classmethod
    def _alpha_positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str):
            if not re.fullmatch(r"[1-9][0-9]{0,5}r|r", v.strip()):
                raise ValueError(
                    f"lora_alpha {_short(v)} is neither an integer nor a multiple of r. Fix: write e.g. 32, `r` or `2r`"
                )
            if int(v.strip()[:-1] or 1) > MAX_ALPHA_MULTIPLE:
                raise ValueError(
                    f"lora_alpha {v.strip()!r} is more than {MAX_ALPHA_MULTIPLE} times r. Fix: use `r`, `2r` or `4r`"
                )
            return v.strip()
        if v is not None and v <= 0:
            raise ValueError("lora_alpha must be positive. Fix: omit it (default 2r) or set a positive integer")
        if v is not None and v > MAX_LORA_ALPHA:
            raise ValueError(f"lora_alpha is above {MAX_LORA_ALPHA:,}. Fix: omit it (default 2r) or use e.g. 32")
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
    def _sweep_is_valid(cls, v: dict[str, list[Any]] | None, info: ValidationInfo) -> dict[str, list[Any]] | None:
        """Sweepable keys, a bounded grid, every value valid as its setting, and every grid point of valid values a
        valid adapter (checked once every other field is valid: a point is the other fields plus its values)."""
        if v is None:
            return v
        allowed = {"r", "lora_alpha", "target_modules", "learning_rate", "method", "seed", "variant"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"sweep keys {bad} are not sweepable; use some of {sorted(allowed)}")
        empty = sorted(k for k, vals in v.items() if not vals)
        if empty:
            raise ValueError(f"sweep values for {empty} are empty lists: give at least one value")
        points = math.prod(len(vals) for vals in v.values())
        if points > MAX_SWEEP_POINTS:
            raise ValueError(
                f"the sweep is a grid of {points:,} points, each a training run; at most {MAX_SWEEP_POINTS:,} are "
                "allowed. Fix: sweep fewer values"
            )
        bad_values = {
            (key, i): found
            for key in sorted(v)
            for i, value in enumerate(v[key])
            if (found := _sweep_value_problems(key, i, value))
        }
        problems = [p for found in bad_values.values() for p in found]
        if set(info.data) >= set(cls.model_fields) - {"sweep"}:
            problems += _grid_problems(info.data, v, skip=set(bad_values))
        if problems:
            raise PydanticCustomError(
                "sweep_values", "{summary}", {"summary": "; ".join(problems), "problems": problems}
            )
        return v

    @property
    def alpha(self) -> int:
        """The effective lora_alpha (2 * r unless set; `2r` style values scale with r)."""
        if self.lora_alpha is None:
            return 2 * self.r
        if isinstance(self.lora_alpha, str):
            return int(self.lora_alpha[:-1] or 1) * self.r
        return self.lora_alpha

    def sweep_points(self) -> list[AdapterSpec]:
        """Expand `sweep` into one concrete spec per grid point (the spec itself when there is no sweep). Every
        point was validated with the spec, so this does not fail on a spec that loaded."""
        if not self.sweep:
            return [self]
        fields = self.model_dump(exclude={"sweep"})
        return [AdapterSpec.model_validate({**fields, **point}) for _, point in _grid(self.sweep)]


class ServingSpec(_Strict):
    """How the vLLM server is started."""

    host: str = Field("127.0.0.1", description="Address vLLM binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of the OpenAI-compatible endpoint.")
    max_loras: int = Field(4, gt=0, le=256, description="Adapters that can share one batch (vLLM --max-loras).")
    tensor_parallel_size: int = Field(
        1, gt=0, le=64, description="GPUs one server shards the model over (vLLM --tensor-parallel-size); 1 on CPU."
    )
    max_model_len: int = Field(512, gt=0, le=MAX_TOKENS, description="Longest prompt + completion in tokens.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weight dtype vLLM serves (and evaluation uses); `auto`: bfloat16 where the hardware "
        "computes in bf16 natively (CUDA, AVX-512-BF16/AMX CPUs), else float32 (bf16 is ~50x slower there).",
    )
    base_model_name: str | None = Field(
        None, description="Served model name of the base; default derived from `base_model`."
    )
    kv_cache_gib: int = Field(1, gt=0, le=4096, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    startup_timeout_s: int = Field(300, gt=0, le=86_400, description="How long to wait for the server to answer.")
    replicas: int = Field(
        1,
        gt=0,
        le=64,
        description="vLLM processes `lorafoundry serve` starts; above 1 they listen on loopback, each on its share "
        "of the CPUs, behind vllm-router, and `host`:`port` is the guard in front of them (serving/fleet.py).",
    )
    router_policy: Literal["consistent_hash", "round_robin", "power_of_two", "random"] = Field(
        "consistent_hash",
        description="How vllm-router spreads requests over the replicas: `consistent_hash` keeps each adapter "
        "version on one replica (fewer loads and evictions); the others ignore the adapter.",
    )
    deterministic: bool = Field(
        False,
        description="The same greedy answer to a request whatever else is in its batch: serve (and evaluate) in "
        "float32. In bf16 a near-tie between the two likeliest tokens can go either way with the batch's "
        "make-up; float32 costs throughput where bf16 is native (docs/benchmarks.md, 'Deterministic mode').",
    )

    compile: bool = Field(
        True,
        description="Let vLLM compile the model (torch.compile) with LoRA on, as it does without: on CPU vLLM "
        "runs every LoRA model eagerly, and lorafoundry's vLLM plugin makes its LoRA layers compilable "
        "(serving/cpu_lora_fix.py; tokens/s in docs/benchmarks.md, 'Compiled LoRA on CPU'). The compile makes "
        "the server's start slower (on 2 cores: SmolLM2 ~100 s more the first time, less once inductor's cache "
        "in /tmp holds it). false: vLLM's --enforce-eager.",
    )

    @model_validator(mode="after")
    def _deterministic_is_float32(self) -> ServingSpec:
        if self.deterministic and self.dtype in ("bfloat16", "float16"):
            raise PydanticCustomError(
                "serving_problems",
                "deterministic: true computes in float32, but dtype is {dtype!r}. Fix: remove dtype (or set it to "
                "auto or float32), or set deterministic: false to serve in {dtype}.",
                {"dtype": self.dtype},
            )
        return self

    @property
    def compute_dtype(self) -> str:
        """The dtype setting serving and evaluation use: `float32` when deterministic, else `dtype`."""
        return "float32" if self.deterministic else self.dtype


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
    return ".".join(_key(p) for p in loc if not str(p).startswith("function-")) or "(top level)"


def _key(part: Any) -> str:
    """One part of a field path: a key as written, cut short (keys are names, not documents)."""
    text = str(part)
    return text if len(text) <= 64 else text[:61] + "..."


#: Error types of a number out of its field's bounds or not a number of its kind: their messages get the bounds.
_NUMBER_ERRORS = {
    "int_type",
    "int_parsing",
    "int_parsing_size",
    "int_from_float",
    "float_type",
    "float_parsing",
    "finite_number",
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
}

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 4, 4, 60, 40, 60


def _short(value: Any) -> str:
    """repr() of a value from a spec, cut short: a list of a million items, or a megabyte string, prints in a line."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _point_value(value: Any) -> str:
    """One value of a grid point as its label shows it: `pissa`, `0.0002`, `['q_proj', 'v_proj']`."""
    return _key(value) if isinstance(value, str) else _short(value)


def _describe(err: dict, model: type[BaseModel], path: str | None = None, relative: bool = False) -> list[str]:
    """The problems one pydantic error stands for, each "field.path: message (got value). Fix: ...". ``relative``:
    a path relative to ``model``, where a problem of the whole model is only "message"."""
    loc = tuple(p for p in err["loc"] if not isinstance(p, str) or "[" not in p)
    path = path or _loc(loc)
    value = _short(err.get("input"))
    if err["type"] == "sweep_values":  # `.r.1: ...` for a value, `[r=4, method=qlora]: ...` for a grid point
        return [f"{path}{'' if p.startswith('[') else '.'}{p}" for p in err["ctx"]["problems"]]
    if err["type"] == "adapter_problems":
        return [p if relative and not loc else f"{path}: {p}" for p in err["ctx"]["problems"]]
    if err["type"] == "extra_forbidden":
        parent = _fields_at(model, loc[:-1])
        allowed = f"; allowed keys here: {', '.join(parent)}" if parent else ""
        return [
            f"{path}: unknown key {_short(loc[-1])} (value {value}){allowed}. Fix: remove it or correct its spelling."
        ]
    if err["type"] == "missing":
        return [f"{path}: required key is missing. Fix: add `{loc[-1]}`."]
    msg = err["msg"].removeprefix("Value error, ")
    fix = _number_fix(model, loc) if err["type"] in _NUMBER_ERRORS and loc else ""
    return [f"{path}: {msg} (got {value}).{fix}"]


def _number_fix(model: type[BaseModel], loc: tuple) -> str:
    """The fix a number error gets from its field's bounds, e.g. " Fix: use a whole number from 1 to 512, e.g. 8,
    16 or 64."; empty for a field without bounds."""
    field = _model_at(model, loc[:-1]).model_fields.get(str(loc[-1]))
    if field is None:
        return ""
    bounds = {key: getattr(m, key) for m in field.metadata for key in ("gt", "ge", "lt", "le") if hasattr(m, key)}
    if not bounds:
        return ""
    args = get_args(field.annotation) or (field.annotation,)
    kind = "whole number" if int in args and float not in args else "number"
    if "ge" in bounds and "le" in bounds:
        span = f"from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    else:
        words = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}
        span = " and ".join(f"{words[key]} {_number(bound)}" for key, bound in bounds.items())
    examples = [_number(x) for x in field.examples or []]
    such_as = f", e.g. {', '.join(examples[:-1])} or {examples[-1]}" if len(examples) > 1 else ""
    return f" Fix: use a {kind} {span}{such_as}."


def _number(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model found by walking ``loc`` from ``model`` (dict keys and list indexes are skipped)."""
    current = model
    for part in loc:
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
    return current


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` (dict keys are skipped)."""
    return [n for n in _model_at(model, loc).model_fields if n != "spec_dir"]


def _sweep_value_problems(key: str, index: int, value: Any) -> list[str]:
    """Problems of one sweep value, checked as the setting it stands for, each named `<key>.<index>`."""
    try:
        AdapterSpec.model_validate({"dataset": "_", key: value})
    except ValidationError as e:
        return [p for err in e.errors() for p in _describe(err, AdapterSpec, path=f"{key}.{index}")]
    return []


def _grid(sweep: dict[str, list[Any]]) -> list[tuple[set[tuple[str, int]], dict[str, Any]]]:
    """A sweep's grid points in training order (keys sorted, the last one varying fastest): each as the (key, index)
    of its values and key -> value."""
    keys = sorted(sweep)
    grid = itertools.product(*(list(enumerate(sweep[k])) for k in keys))
    return [
        ({(k, i) for k, (i, _) in zip(keys, p, strict=True)}, {k: x for k, (_, x) in zip(keys, p, strict=True)})
        for p in grid
    ]


def _grid_problems(fields: dict[str, Any], sweep: dict[str, list[Any]], skip: set[tuple[str, int]]) -> list[str]:
    """``[key=value, ...]: problem`` for every grid point that is not a valid adapter, validated as one from
    ``fields`` and its values; points with a value in ``skip`` (already reported) are left out. A problem found at
    every point of a grid of several is named once, as ``[every point]``."""
    found: dict[str, list[str]] = {}
    for indexes, point in _grid(sweep):
        if indexes & skip:
            continue
        label = "[" + ", ".join(f"{k}={_point_value(point[k])}" for k in sweep) + "]"
        try:
            AdapterSpec.model_validate({**fields, **point})
            found[label] = []
        except ValidationError as e:
            found[label] = [p for err in e.errors() for p in _describe(err, AdapterSpec, relative=True)]
    everywhere = set.intersection(*map(set, found.values())) if len(found) > 1 else set()
    problems = [f"[every point]: {p}" for p in dict.fromkeys(p for ps in found.values() for p in ps if p in everywhere)]
    return problems + [f"{label}: {p}" for label, ps in found.items() for p in ps if p not in everywhere]


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
            if not is_valid_name(str(name)):
                problems.append(
                    f"{section}.{_key(name)}: name {_short(name)} is not allowed. Fix: use 1-64 characters from "
                    "letters, digits, '.', '_', '-', starting with a letter or digit."
                )
    for name, ds in datasets.items():
        if isinstance(ds, dict) and isinstance(ds.get("path"), str):
            problems += _dataset_path_problems(f"datasets.{_key(name)}.path", ds["path"], spec_dir)
    for name, ad in adapters.items():
        if not isinstance(ad, dict):
            continue
        named = [("dataset", ad["dataset"])] if isinstance(ad.get("dataset"), str) else []
        if isinstance(ad.get("datasets"), dict):
            named += [(f"datasets.{_key(ds)}", ds) for ds in ad["datasets"]]
        for field, ds in named:
            if ds not in datasets:
                problems.append(
                    f"adapters.{_key(name)}.{field}: {_short(ds)} is not a declared dataset. Fix: use one "
                    f"of {sorted(datasets)} or declare it under `datasets`."
                )
    if isinstance(raw.get("base_model"), str):
        problems += _base_model_problems(raw["base_model"], spec_dir)
    return problems


def _dataset_path_problems(field: str, value: str, spec_dir: Path) -> list[str]:
    """Problems of one dataset path: no file could have its name, the file is missing, or the glob matches none
    (found as the cleaner finds them, by :func:`glob_files`) or looks at too many entries."""
    p = Path(value) if Path(value).is_absolute() else spec_dir / value
    why = unopenable(p)
    if why:
        return [f"{field}: {_short(value)} {why}. Fix: give the path of a file or a glob, relative to the spec file."]
    if not has_magic(value):
        if is_file(p):
            return []
        return [
            f"{field}: file {_short(value)} does not exist (looked at {cut(str(p))}). Fix: give a path relative to "
            "the spec file or an absolute path."
        ]
    try:
        found = glob_files(str(p))
    except GlobTooBroadError as e:
        return [f"{field}: the glob {_short(value)} {e}."]
    if found.files:
        return []
    return [
        f"{field}: the glob {_short(value)} matches no file{found.why_empty()} (looked in {cut(str(p.parent))}). "
        "Fix: correct the pattern, relative to the spec file."
    ]


def _base_model_problems(base: str, spec_dir: Path) -> list[str]:
    """Problems of ``base_model``: an unknown built-in, a name no file could have, or a local path that is no
    Hugging Face model dir."""
    if base.startswith("builtin:"):
        if base.split(":", 1)[1] in BUILTIN_MODELS:
            return []
        names = ", ".join(f"`builtin:{n}`" for n in BUILTIN_MODELS)
        return [
            f"base_model: {_short(base)} is not a built-in model. Fix: use one of {names}, a local model dir, or a "
            "hub id in your local HF cache."
        ]
    local = Path(base) if Path(base).is_absolute() else spec_dir / base
    why = unopenable(local)
    if why:
        return [
            f"base_model: {_short(base)} {why}. Fix: use a built-in model, a local model dir, or a hub id such as "
            "`HuggingFaceTB/SmolLM2-135M-Instruct`."
        ]
    looks_local = base.startswith((".", "/", "~")) or is_dir(local) or is_file(local)
    if looks_local and not is_file(local / "config.json"):
        return [
            f"base_model: {_short(base)} is not a Hugging Face model dir (no config.json in {cut(str(local))}). Fix: "
            "point it at a dir written by save_pretrained."
        ]
    return []


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
        problems = [p for err in e.errors() for p in _describe(err, PipelineSpec)] + problems
    if problems:
        raise SpecError(problems, source)
    assert spec is not None
    return spec


class _RefusedYAML(Exception):
    """A spec file refused while it is read, before any Python value is built; the message is the problem."""


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses, while composing and so before expanding anything, aliases that would
    expand the file past ``MAX_ALIAS_VALUES`` values (a YAML anchor bomb), aliases inside the collection they
    name, nesting deeper than ``MAX_YAML_DEPTH``, and integers too long to convert."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._path: list[str] = []  # keys and indexes from the top to the node being composed
        self._open_anchors: set[str] = set()  # anchors of collections still being composed
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to
        self._alias_values = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if parent is not None:
            label = "(key)" if index is None else str(index)  # None: composing a key, not a value
            self._path.append(_key(index.value) if isinstance(index, yaml.ScalarNode) else label)
        if len(self._path) > MAX_YAML_DEPTH:
            raise _RefusedYAML(
                f"{self._where()}: nested more than {MAX_YAML_DEPTH} levels deep (line "
                f"{self.peek_event().start_mark.line + 1}). Fix: a spec is a few levels deep; remove the extra nesting."
            )
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self.anchors:
            self._charge_alias(event)
        opens = isinstance(event, yaml.CollectionStartEvent) and event.anchor is not None
        if opens:
            self._open_anchors.add(event.anchor)
        node = super().compose_node(parent, index)
        if opens:
            self._open_anchors.discard(event.anchor)
        if parent is not None:
            self._path.pop()
        return node

    def _where(self) -> str:
        return ".".join(self._path) or "(top level)"

    def _charge_alias(self, event: yaml.AliasEvent) -> None:
        """Count the values an alias expands to; refuse it when all aliases so far pass the bound."""
        where = f"{self._where()}: alias *{_key(event.anchor)} (line {event.start_mark.line + 1})"
        if event.anchor in self._open_anchors:
            raise _RefusedYAML(
                f"{where} sits inside the value it names, a value that never ends. Fix: remove the alias."
            )
        size = _expanded_size(self.anchors[event.anchor], self._sizes)
        self._alias_values += size
        if self._alias_values > MAX_ALIAS_VALUES:
            shown = f"{size:,}" if size < 10**12 else "more than 10**12"
            raise _RefusedYAML(
                f"{where} expands to {shown} values, and all aliases in the file to more than "
                f"{MAX_ALIAS_VALUES:,}: refused without expanding it (a YAML anchor bomb). "
                "Fix: write the values out, or alias only small values."
            )

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            raise _RefusedYAML(
                f"(file): line {node.start_mark.line + 1}: an integer of {len(node.value):,} characters. "
                "Fix: write a number of a sensible size."
            ) from None


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)


class _LargeSpecLoader(_SpecLoader):
    """:class:`_SpecLoader` on libyaml's scanner and parser, for a file past ``MAX_PYTHON_YAML_CHARS``: a 50 MiB
    value scans in 0.4 s there and in 15 s in Python. Composing, and every check of it, stays in Python."""

    def __init__(self, text: str) -> None:
        super().__init__("")
        self._events = yaml.cyaml.CParser(text)

    def check_event(self, *choices: type) -> bool:
        return self._events.check_event(*choices)

    def peek_event(self) -> yaml.Event:
        return self._events.peek_event()

    def get_event(self) -> yaml.Event:
        return self._events.get_event()

    def dispose(self) -> None:
        self._events.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values (scalars and collections) ``node`` stands for once every alias in it is expanded."""
    if id(node) not in sizes:
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _duplicate_keys(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> list[str]:
    """A problem for each key repeated in one mapping (YAML would keep the last one without a word)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an aliased node: checked where its anchor is
        return []
    seen.add(id(node))
    problems = []
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.SequenceNode):
        children = [(f"{path}.{i}" if path else str(i), item) for i, item in enumerate(node.value)]
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = _key(key.value) if isinstance(key, yaml.ScalarNode) else "(key)"
            child = f"{path}.{name}" if path else name
            children.append((child, value))
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be followed by keys that override the merged ones
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_line:
                problems.append(
                    f"{child}: key {_short(key.value)} appears twice in one mapping, on lines "
                    f"{first_line[key.tag, key.value]} and {line}; YAML would silently keep the last. "
                    "Fix: delete one of them."
                )
            else:
                first_line[key.tag, key.value] = line
    for child, value in children:
        problems += _duplicate_keys(value, child, seen)
    return problems


def parse_spec_yaml(text: str, source: str = "spec") -> Any:
    """``yaml.safe_load``, hardened for spec files: refuses anchor bombs, recursive aliases, deep nesting and
    over-long integers before expanding anything, and duplicate keys, each named with its line.

    Args:
        text: the YAML text of one spec file.
        source: how errors name the file.

    Raises:
        SpecError: listing every duplicate key, or the one alias, depth or YAML syntax problem found.
    """
    large = len(text) > MAX_PYTHON_YAML_CHARS and yaml.__with_libyaml__
    loader = (_LargeSpecLoader if large else _SpecLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _duplicate_keys(node)
        if problems:
            raise SpecError(problems, source)
        return loader.construct_document(node)
    except _RefusedYAML as e:
        raise SpecError([str(e)], source) from None
    except yaml.YAMLError as e:
        raise SpecError([f"(file): not valid YAML: {e}"], source) from e
    finally:
        loader.dispose()


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec file. Raises :class:`SpecError` (every problem at once)."""
    path = Path(path)
    if not path.exists():
        raise SpecError(
            [f"spec file {str(path)!r} does not exist. Fix: pass the path of a YAML spec, e.g. examples/demo.yaml."],
            str(path),
        )
    raw = parse_spec_yaml(path.read_text(encoding="utf-8"), str(path))
    return validate_spec(raw, path.resolve().parent, str(path))
