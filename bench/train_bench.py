"""Training throughput: lorafoundry's trainer against a plain Hugging Face Trainer + peft script with padded
batches, same base, data, LoRA config and batch size, in one run.

    python bench/train_bench.py                                  # builtin:tiny on the demo's categories data
    python bench/train_bench.py --model 30m --data mixed --rows 1200

--model: `builtin` (the demo base, built under --home if needed) or a randomly initialised Llama size from
bench/_common.py (4m, 30m, 150m). --data: a demo dataset (`categories`, `sentiment`) or `mixed` (generated chats
with log-normal answer lengths, as in public instruction sets). Both trainers load the base in bf16 and train
with bf16 autocast. Tokens/s counts real (non-padding) tokens over the epoch's wall time, training loop only
(model load excluded for both). Padding fraction = padding tokens / all tokens fed to the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_hf(base_path: Path, rows: list[dict], spec, out: Path) -> dict:
    """The baseline: what a short HF script does: tokenize with the chat template, pad per batch, Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from lora_assets.train import tokenize_example

    tok = AutoTokenizer.from_pretrained(base_path)
    examples = [tokenize_example(tok, r["messages"], spec.max_seq_len) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                                             target_modules=spec.resolved_target_modules(), task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    fed = {"real": 0, "all": 0}

    def counting(features):
        batch = collator(features)
        fed["real"] += int(batch["attention_mask"].sum())
        fed["all"] += batch["attention_mask"].numel()
        return batch

    args = TrainingArguments(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=spec.batch_size,
                             learning_rate=spec.learning_rate, lr_scheduler_type=spec.lr_scheduler,
                             logging_steps=50, save_strategy="no", report_to="none", seed=spec.seed, bf16=True,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=counting)
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": fed["real"] / wall, "padding_fraction": 1 - fed["real"] / fed["all"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=ROOT / ".lorafoundry")
    ap.add_argument("--model", default="builtin", help="builtin, or a random Llama size: 4m, 30m, 150m")
    ap.add_argument("--data", default="categories", help="categories, sentiment (demo data) or mixed (generated)")
    ap.add_argument("--rows", type=int, default=0, help="use the first N input rows only (0: all; mixed: 2000)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from bench._common import bench_spec, mixed_length_rows, random_llama, write_jsonl
    from lora_assets.clean import read_split
    from lora_assets.pipeline import Pipeline
    from lora_assets.train import train_adapter

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    base = "builtin:tiny" if args.model == "builtin" else str(random_llama(args.home / "bench-models" / args.model,
                                                                          args.model))
    if args.data == "mixed":
        data = write_jsonl(mixed_length_rows(args.rows or 2000), work / "mixed.jsonl")
    else:
        data = ROOT / "examples" / "data" / f"{args.data}.jsonl"
        if args.rows:
            lines = data.read_text().splitlines(keepends=True)[: args.rows]
            data = work / f"{args.data}-{args.rows}.jsonl"
            data.write_text("".join(lines))
    spec = bench_spec(base, data, method="lora", max_seq_len=args.max_seq_len, batch_size=args.batch_size)
    pipe = Pipeline(spec, args.home)
    clean = pipe.clean("bench")
    adapter = spec.adapters["bench"]
    rows = read_split(clean, "train")
    ours = train_adapter("bench", adapter, pipe.base, clean, work / "adapters")
    manifest = json.loads((Path(ours.adapter_dir) / "training_manifest.json").read_text())
    base_run = plain_hf(pipe.base.path, rows, adapter, work / "hf")
    print(f"model: {args.model} ({ours.total_params / 1e6:.1f} M params), data: {args.data}, {len(rows)} examples, "
          f"{ours.tokens} tokens, batch {adapter.batch_size}, r={adapter.r}, max_seq_len {adapter.max_seq_len}")
    ours_pad, base_pad = manifest["padding_fraction"], base_run["padding_fraction"]
    print(f"lorafoundry   {ours.wall_s:7.1f} s  {ours.tokens_per_s:8.0f} tok/s  padding {ours_pad:.1%}"
          f"  (checkpoints every {manifest['checkpoint_every']} steps included)")
    print(f"plain HF      {base_run['wall_s']:7.1f} s  {base_run['tokens_per_s']:8.0f} tok/s  padding {base_pad:.1%}")
    print(f"ratio (tokens/s, lorafoundry / plain HF): {ours.tokens_per_s / base_run['tokens_per_s']:.2f}x "
          "(goal >= 1.5x)")


if __name__ == "__main__":
    main()
