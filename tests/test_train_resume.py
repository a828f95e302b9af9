"""Training survives SIGKILL: a rerun resumes from the last complete checkpoint and ends where an uninterrupted
run ends (same single epoch, no example seen twice or skipped)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_assets.base_model import resolve_base_model
from lora_assets.clean import clean_dataset
from lora_assets.home import Home
from lora_assets.spec import DatasetSpec
from lora_assets.train import latest_complete_checkpoint, run_key, train_adapter
from tests.train_worker import RESUME_SPEC

pytestmark = pytest.mark.slow


def make_data(tmp_path: Path, base: Path):
    from transformers import AutoTokenizer

    rows = [{"prompt": f"item {i}: what comes after {i}?", "completion": f"{i + 1}"} for i in range(400)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return clean_dataset(
        "d", DatasetSpec(path="d.jsonl"), src, tmp_path / "datasets", AutoTokenizer.from_pretrained(base)
    )


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, random_base):
    clean = make_data(tmp_path, random_base)
    base = resolve_base_model(str(random_base), tmp_path)
    killed = Home.at(tmp_path / "killed")
    killed.adapters.mkdir(parents=True)
    ckpts = killed.adapters / "a" / (run_key(RESUME_SPEC, base, clean) + ".tmp") / "checkpoints"

    worker = Path(__file__).with_name("train_worker.py")
    proc = subprocess.Popen(
        [sys.executable, str(worker), str(random_base), str(tmp_path / "datasets"), str(killed.root)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.log").open("w"),
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = latest_complete_checkpoint(ckpts)
            if ckpt is not None and int(ckpt.name.split("-")[1]) >= 10:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the worker ended before it could be killed:\n" + (tmp_path / "worker.log").read_text()[-3000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed.adapters / "a" / run_key(RESUME_SPEC, base, clean)).exists()  # nothing half-finished published

    resumed = train_adapter("a", RESUME_SPEC, base, clean, killed)
    manifest = json.loads((Path(resumed.adapter_dir) / "training_manifest.json").read_text())
    assert manifest["resumed_from_step"] >= 10
    assert resumed.steps == manifest["steps_per_epoch"] == -(-clean.rows_train // 4)  # one epoch, exactly

    reference = train_adapter("a", RESUME_SPEC, base, clean, Home.at(tmp_path / "reference"))
    assert json.loads((Path(reference.adapter_dir) / "training_manifest.json").read_text())["resumed_from_step"] is None
    got = load_file(Path(resumed.adapter_dir) / "adapter_model.safetensors")
    want = load_file(Path(reference.adapter_dir) / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
