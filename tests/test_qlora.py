"""QLoRA on CPU (bitsandbytes NF4, double quant): trains on the tiny base and beats it, evaluated at bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_assets.hardware import resolve_dtype
from lora_assets.pipeline import Pipeline

pytestmark = pytest.mark.slow


def test_qlora_adapter_beats_the_base(home_copy, demo_spec):
    """Trained in a copy of the session's home: the session's adapters dir stays as the session trained it."""
    spec = demo_spec.model_copy(
        update={"adapters": {"sentiment-qlora": demo_spec.adapters["sentiment"].model_copy(update={"method": "qlora"})}}
    )
    pipe = Pipeline(spec, home_copy)
    result = pipe.train("sentiment-qlora")
    assert result.method == "qlora" and "set in the spec" in result.method_reason
    manifest = json.loads((Path(result.adapter_dir) / "training_manifest.json").read_text())
    assert manifest["method"]["method"] == "qlora" and manifest["libraries"]["bitsandbytes"]
    ev = pipe.evaluate("sentiment-qlora")
    assert ev.generation["dtype"] == resolve_dtype("auto")  # evaluated on the unquantized base, as it will be served
    em = ev.metrics["exact_match"]
    assert em["adapter"] > em["base"] + 0.5, em
    agreement = ev.precision_agreement  # greedy answers on the 4-bit training base vs the bf16 serving base
    assert agreement is not None and agreement["rows"] == ev.rows
    # The adapter was trained against the 4-bit base and is served on the unquantized one: its greedy answers must
    # mostly survive that switch (measured: 192 of 192 identical, 2026-11-30; 90% leaves room for a tie flipping).
    assert agreement["identical_greedy_outputs"] >= 0.9 * ev.rows, agreement
    assert agreement["share_identical"] == round(agreement["identical_greedy_outputs"] / ev.rows, 4)
