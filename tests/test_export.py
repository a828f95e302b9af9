"""Merged export (lora_assets/export.py): a registered adapter folded into its base is the same model, as a complete
Hugging Face dir that loads as a base_model; changed files, another base, a taken OUT_DIR are refused."""

from __future__ import annotations

import json

import pytest
import torch

from lora_assets.base_model import resolve_base_model
from lora_assets.export import LINEAGE_FILE, ExportError, export_merged
from registry.records import NewAdapter
from registry.store import AdapterRegistry

PROMPTS = ["<|user|>\nWhich category do these words share: tiger, wolf and zebra?<|end|>\n<|assistant|>\n", "apple"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def registered(random_base, tmp_path_factory):
    """A LoRA adapter with random A and B (so merging changes every projection) on the random base, registered."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    adapter = root / "adapters" / "colors"
    peft_model.save_pretrained(adapter)
    reg = AdapterRegistry(root / "registry.duckdb")
    rec = reg.register(
        NewAdapter(
            name="colors",
            path=adapter,
            base_model=str(random_base),
            base_model_hash=resolve_base_model(str(random_base), root).content_hash,
            dataset="colors",
            dataset_fingerprint="f" * 16,
            metrics={"exact_match": {"base": 0.1, "adapter": 0.7}},
        )
    )
    return root, reg, rec


def _logits_and_greedy(model, tokenizer) -> tuple[list[torch.Tensor], list[list[int]]]:
    logits, greedy = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            logits.append(model(ids).logits[0])
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            greedy.append(out[0, ids.shape[1] :].tolist())
    return logits, greedy


def test_merged_model_answers_like_base_plus_adapter(registered, random_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, rec = registered
    out = export_merged(rec, root, tmp_path / "merged", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(random_base)
    base = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, rec.path).eval()
    merged = AutoModelForCausalLM.from_pretrained(out.path, dtype=torch.float32).eval()

    expected_logits, expected_greedy = _logits_and_greedy(with_adapter, tokenizer)
    with_adapter.disable_adapter_layers()
    base_logits, _ = _logits_and_greedy(with_adapter, tokenizer)
    got_logits, got_greedy = _logits_and_greedy(merged, tokenizer)
    assert got_greedy == expected_greedy
    for got, want, plain in zip(got_logits, expected_logits, base_logits, strict=True):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        assert not torch.allclose(got, plain, atol=1e-3)  # the adapter did change the model


def test_the_merged_dir_is_a_complete_model_dir_with_lineage(registered, tmp_path):
    root, _, rec = registered
    out = export_merged(rec, root, tmp_path / "merged-bf16")  # default dtype: bfloat16
    files = {p.name for p in out.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", LINEAGE_FILE} <= files
    config = json.loads((out.path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    lineage = json.loads((out.path / LINEAGE_FILE).read_text())
    assert lineage["merged_from"] == "colors@1" and lineage["adapter_sha256"] == rec.adapter_sha256
    assert lineage["base_model_hash"] == rec.base_model_hash and lineage["dataset_fingerprint"] == "f" * 16
    card = (out.path / "README.md").read_text()
    assert "base_model_relation: merge" in card and rec.adapter_sha256 in card
    # usable as a spec's base_model: it resolves, and its content hash is the export's weights hash
    as_base = resolve_base_model(str(out.path), tmp_path)
    assert as_base.content_hash == out.weights_sha256
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no leftover work dir


def test_changed_adapter_files_are_refused(registered, tmp_path):
    import shutil

    root, _, rec = registered
    copy = tmp_path / "copy"
    shutil.copytree(rec.path, copy)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="files changed after registration"):
        export_merged(rec.model_copy(update={"path": str(copy)}), root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_base_taken_out_dir_and_bad_dtype_are_refused(registered, tmp_path):
    root, _, rec = registered
    with pytest.raises(ExportError, match="trained on base"):
        export_merged(rec.model_copy(update={"base_model_hash": "0" * 64}), root, tmp_path / "a")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_merged(rec, root, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="--dtype 'int3' is not supported"):
        export_merged(rec, root, tmp_path / "b", dtype="int3")


def test_export_is_recorded_as_an_event_on_the_version(registered):
    _, reg, rec = registered
    reg.record_event("colors", rec.version, "export_merged", {"out_dir": "/tmp/x", "dtype": "bfloat16"})
    events = reg.events("colors", rec.version)
    assert events[-1]["action"] == "export_merged" and events[-1]["detail"]["dtype"] == "bfloat16"
    with pytest.raises(Exception, match="no adapter colors@99"):
        reg.record_event("colors", 99, "export_merged", {})
    with pytest.raises(Exception, match="is not an event name"):
        reg.record_event("colors", rec.version, "DROP TABLE", {})


def test_a_variant_vllm_cannot_serve_merges_too(random_base, tmp_path):
    """DoRA (peft use_dora): vLLM's multi-LoRA path refuses it, the merged model is how it is served."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False, use_dora=True)
    get_peft_model(model, config).save_pretrained(tmp_path / "dora")
    reg = AdapterRegistry(tmp_path / "registry.duckdb")
    rec = reg.register(
        NewAdapter(
            name="dora",
            path=tmp_path / "dora",
            base_model=str(random_base),
            base_model_hash=resolve_base_model(str(random_base), tmp_path).content_hash,
            method="lora",
            training_config={"variant": "dora"},
        )
    )
    out = export_merged(rec, tmp_path, tmp_path / "merged", dtype="float32")
    assert json.loads((out.path / LINEAGE_FILE).read_text())["variant"] == "dora"
    tokenizer = AutoTokenizer.from_pretrained(random_base)
    base = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch.float32)
    want = _logits_and_greedy(PeftModel.from_pretrained(base, rec.path).eval(), tokenizer)
    got = _logits_and_greedy(AutoModelForCausalLM.from_pretrained(out.path, dtype=torch.float32).eval(), tokenizer)
    assert got[1] == want[1]
    assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got[0], want[0], strict=True))


def test_cli_exports_records_the_event_and_refuses_with_one_line(registered, tmp_path):
    from typer.testing import CliRunner

    from orchestration.cli import app

    root, reg, rec = registered
    runner = CliRunner()
    out = tmp_path / "cli-merged"
    res = runner.invoke(app, ["registry", "export-merged", "colors@1", str(out), "--home", str(root)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").exists() and "colors@1 merged into" in res.output
    event = reg.events("colors", 1)[-1]
    assert event["action"] == "export_merged" and event["detail"]["out_dir"] == str(out.resolve())
    again = runner.invoke(app, ["registry", "export-merged", "colors@1", str(out), "--home", str(root)])
    assert again.exit_code == 1 and "already exists and is not empty" in again.output
    assert "Traceback" not in again.output
    missing = runner.invoke(app, ["registry", "export-merged", "colors@9", str(tmp_path / "x"), "--home", str(root)])
    assert missing.exit_code == 1 and "no adapter 'colors' version 9" in missing.output
