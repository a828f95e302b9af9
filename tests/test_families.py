"""Every decoder family vLLM serves with LoRA, end to end on a random-weight model of each (tests/families.py):
`all-linear` found from the model, one epoch, evaluation, registration, and vLLM's greedy tokens with the
registered adapter equal to peft's on held-out prompts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_assets.architectures import VLLM_LORA_ARCHITECTURES, linear_layers
from lora_assets.pipeline import Pipeline
from lora_assets.spec import load_spec
from registry.store import AdapterRegistry
from tests.families import FAMILIES, build_family_model

PROMPTS = 8
NEW_TOKENS = 8


def test_the_family_table_matches_the_installed_vllm():
    """Each architecture lorafoundry lists resolves, in the installed vLLM, to a class that supports LoRA and is
    the implementation the table says (its own, or the Transformers backend)."""
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    assert set(VLLM_LORA_ARCHITECTURES) == {arch for arch, _, _ in FAMILIES.values()}
    for arch, impl in VLLM_LORA_ARCHITECTURES.items():
        cls = ModelRegistry._try_load_model_cls(arch)
        assert cls is not None and supports_lora(cls), arch
        assert (cls.__name__ == "TransformersForCausalLM") == (impl == "transformers"), (arch, cls.__name__)


def _rows(n: int) -> list[dict]:
    colours = ["red", "green", "blue", "white"]
    return [{"prompt": f"What colour is item {i}?", "completion": f"Item {i} is {colours[i % 4]}."} for i in range(n)]


def _train_one(family: str, tokenizer_dir: Path, root: Path) -> dict:
    """One family through the pipeline (clean, one epoch, evaluate, register) and peft's greedy tokens."""
    t0 = time.time()
    model_dir = build_family_model(family, tokenizer_dir, root / family / "model")
    (root / family / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(64)))
    spec_path = root / family / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(model_dir),
                "datasets": {"d": {"path": "d.jsonl", "eval_fraction": 0.25}},
                # evaluation runs as on any adapter; 2 rows keep it short (the 8 prompts below are the comparison)
                "adapters": {f"{family}-a": {"dataset": "d", "r": 8, "learning_rate": 5e-3, "max_eval_rows": 2}},
                "serving": {"dtype": "float32"},
            }
        )
    )
    pipe = Pipeline(load_spec(spec_path), root / family / "home")
    pipe.preflight()
    pipe.clean("d")
    key = f"{family}-a"
    pipe.train(key)
    ev = pipe.evaluate(key)
    rec = pipe.register(key)
    (verified,) = AdapterRegistry(root / family / "home" / "registry.duckdb").verify(key, rec.version)
    prompts = _held_out_prompts(pipe, key)
    return {
        "family": family,
        "architecture": FAMILIES[family][0],
        "model": str(model_dir),
        "adapter": str(rec.path),
        "verified": verified.ok,
        "target_modules": json.loads((Path(rec.path) / "adapter_config.json").read_text())["target_modules"],
        "eval_rows": ev.rows,
        "prompts": prompts,
        "peft": _peft_greedy(model_dir, Path(rec.path), prompts),
        "pipeline_s": round(time.time() - t0, 1),
        "rank": 8,
        "name": key,
        "max_tokens": NEW_TOKENS,
    }


def _held_out_prompts(pipe: Pipeline, key: str) -> list[list[int]]:
    """The eval split's prompts as token ids, rendered by the base's chat template with the generation prompt."""
    from transformers import AutoTokenizer

    from lora_assets.clean import read_split

    tok = AutoTokenizer.from_pretrained(pipe.base.path)
    rows = read_split(pipe.training_data(key), "eval")[:PROMPTS]
    assert len(rows) == PROMPTS
    texts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _peft_greedy(model_dir: Path, adapter_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    out = []
    with torch.no_grad():  # argmax step by step: past the end-of-text token too, as vLLM with ignore_eos
        for ids in prompts:
            seq = list(ids)
            for _ in range(NEW_TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            out.append(seq[len(ids) :])
    return out


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, random_base) -> dict[str, dict]:
    """Every family trained, evaluated and registered here, then all served by vLLM in one worker process."""
    root = tmp_path_factory.mktemp("families")
    runs = {f: _train_one(f, random_base, root) for f in FAMILIES}
    jobs, out = root / "jobs.json", root / "vllm.json"
    jobs.write_text(json.dumps(list(runs.values())))
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vllm_family_worker", str(jobs), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    served = json.loads(out.read_text()) if out.exists() else {}
    assert served, proc.stderr[-3000:]
    for f, run in runs.items():
        run["vllm"] = served.get(f, {"error": "not reached:\n" + proc.stderr[-2000:]})
    print(
        f"\nfamily matrix: pipeline {[(f, r['pipeline_s']) for f, r in runs.items()]} s, vLLM {time.time() - t0:.0f} s"
    )
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_registers_and_vllm_serves_what_peft_computes(family_runs, family):
    run = family_runs[family]
    assert sorted(run["target_modules"]) == linear_layers(run["model"])[0]  # all-linear, by this family's names
    assert run["verified"] and run["eval_rows"] > 0
    assert "error" not in run["vllm"], run["vllm"]["error"]
    same = sum(a == b for a, b in zip(run["vllm"]["tokens"], run["peft"], strict=True))
    assert same >= PROMPTS - 1, f"{family}: vLLM {run['vllm']['tokens']} vs peft {run['peft']}"
