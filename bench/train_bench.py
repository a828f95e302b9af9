"""Training throughput and memory: lorafoundry's trainer against a plain Hugging Face Trainer + peft script, same
base, rows, LoRA config and batch size, in one run, each trainer in its own process (so each peak RSS is its own).

    python bench/train_bench.py --model smollm2 --data categories --rows 200   # the real base (issue 13)
    python bench/train_bench.py --model smollm2 --data mixed --rows 200        # long answers
    python bench/train_bench.py --model 30m --data mixed --rows 400            # a random 28 M Llama

--model: `smollm2` (builtin:smollm2-135m-instruct, converted under --home if needed), `builtin` (builtin:tiny) or a
randomly initialised Llama size from bench/_common.py (4m, 30m, 150m). --data: a demo dataset (`categories`,
`sentiment`) or `mixed` (generated chats with log-normal answer lengths, as in public instruction sets).

The baseline is what a practitioner writes at full strength: transformers' Trainer with the length-grouped sampler
(`train_sampling_strategy="group_by_length"`, which removes most padding), padded batches, the model's own loss,
and the number format that is faster on this machine (bf16 autocast on a bf16 base where the hardware computes
in bf16, else fp32: lora_assets.hardware; on an AVX2-only CPU a bf16 matmul is ~50x slower than fp32).
lorafoundry uses the same rule. Tokens/s counts real (non-padding) tokens over the training loop's wall time
(model load excluded for both); lorafoundry's time includes its checkpoints. Peak RSS is the process's maximum
resident set (getrusage), model load included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_hf(base_path: Path, rows: list[dict], spec, out: Path) -> dict:
    """The baseline: tokenize with the chat template, pad per batch, length-grouped sampler, Trainer."""
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

    from lora_assets.chat import tokenize_example
    from lora_assets.hardware import native_bf16

    bf16 = native_bf16()
    tok = AutoTokenizer.from_pretrained(base_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples = [tokenize_example(tok, r["messages"], spec.max_seq_len) for r in rows]
    for e in examples:
        e["length"] = len(e["input_ids"])  # precomputed lengths for the length-grouped sampler
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=spec.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    fed = {"real": 0, "all": 0}

    def counting(features):
        batch = collator([{k: v for k, v in f.items() if k != "length"} for f in features])
        fed["real"] += int(batch["attention_mask"].sum())
        fed["all"] += batch["attention_mask"].numel()
        return batch

    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=spec.seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=counting)
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    out_ = trainer.train()
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tokens_per_s": fed["real"] / wall,
        "padding_fraction": 1 - fed["real"] / fed["all"],
        "dtype": "bf16" if bf16 else "fp32",
        "train_loss": out_.training_loss,
    }


def _setup(args):
    from bench._common import bench_spec, mixed_length_rows, random_llama, write_jsonl
    from lora_assets.pipeline import Pipeline

    work = Path(args.work)
    if args.model == "builtin":
        base = "builtin:tiny"
    elif args.model == "smollm2":
        base = "builtin:smollm2-135m-instruct"
    else:
        base = str(random_llama(args.home / "bench-models" / args.model, args.model))
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
    return pipe, pipe.clean("bench"), spec.adapters["bench"], work


def _child(args) -> None:
    """One trainer in this process; prints one JSON line."""
    from lora_assets.clean import read_split
    from lora_assets.home import Home
    from lora_assets.train import train_adapter

    pipe, clean, adapter, work = _setup(args)
    if args.only == "ours":
        r = train_adapter("bench", adapter, pipe.base, clean, Home.at(work))
        manifest = json.loads((Path(r.adapter_dir) / "training_manifest.json").read_text())
        res = {
            "wall_s": r.wall_s,
            "tokens_per_s": r.tokens_per_s,
            "padding_fraction": manifest["padding_fraction"],
            "train_loss": r.train_loss,
            "tokens": r.tokens,
            "examples": r.examples,
            "params": r.total_params,
            "checkpoint_every": manifest["checkpoint_every"],
        }
    else:
        res = plain_hf(pipe.base.path, read_split(clean, "train"), adapter, work / "hf")
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=ROOT / ".lorafoundry")
    ap.add_argument("--model", default="smollm2", help="smollm2, builtin, or a random Llama size: 4m, 30m, 150m")
    ap.add_argument("--data", default="categories", help="categories, sentiment (demo data) or mixed (generated)")
    ap.add_argument("--rows", type=int, default=0, help="use the first N input rows only (0: all; mixed: 2000)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        return _child(args)

    args.work = tempfile.mkdtemp(prefix="train-bench-")
    _setup(args)  # build/convert the base and clean the data once, before anything is timed
    results = {}
    for who in ("ours", "baseline"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", who, "--work", args.work]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{who} failed:\n{proc.stderr[-3000:]}")
        results[who] = json.loads(line.removeprefix("RESULT "))
    ours, base = results["ours"], results["baseline"]
    print(
        f"model: {args.model} ({ours['params'] / 1e6:.1f} M params), data: {args.data}, {ours['examples']} "
        f"examples, {ours['tokens']} tokens, batch {args.batch_size}, r=16, max_seq_len {args.max_seq_len}"
    )
    print(
        f"lorafoundry   {ours['wall_s']:7.1f} s  {ours['tokens_per_s']:8.0f} tok/s  padding "
        f"{ours['padding_fraction']:.1%}  peak RSS {ours['peak_rss_bytes'] / 1e9:.2f} GB  "
        f"loss {ours['train_loss']:.4f}"
        f"  (checkpoints every {ours['checkpoint_every']} steps included)"
    )
    print(
        f"plain HF      {base['wall_s']:7.1f} s  {base['tokens_per_s']:8.0f} tok/s  padding "
        f"{base['padding_fraction']:.1%}  peak RSS {base['peak_rss_bytes'] / 1e9:.2f} GB  "
        f"loss {base['train_loss']:.4f}"
        f"  ({base['dtype']}, group_by_length)"
    )
    print(
        f"ratio (tokens/s, lorafoundry / plain HF): {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x (goal >= 1.5x)"
    )
    print(
        f"ratio (peak RSS, lorafoundry / plain HF): {ours['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x "
        "(goal <= 0.5x)"
    )


if __name__ == "__main__":
    main()
