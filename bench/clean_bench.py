"""Cleaning benchmark: lorafoundry's DuckDB cleaner against a straightforward pandas implementation of the same
rules, on the same generated file, in one run.

    python bench/clean_bench.py --rows 1000000

The file has 85% unique rows, 10% exact duplicates and 5% near-duplicates (a case/punctuation variant or
one word appended), plus a sprinkle
of PII and bad lines. Each implementation runs in its own process, so its peak RSS is its own. Both use the same
MinHash/LSH core (lora_assets.clean.minhash_signatures / near_duplicate_of); what differs is everything around
it: parsing, normalization, PII, hashing, shingling, splitting and writing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river model adapter token vector batch kernel cache "
    "server client table query index matrix signal garden window pencil rocket planet ocean forest"
).split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    kept: list[dict] = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            r = rng.random()
            if r < 0.10 and kept:  # exact duplicate of an earlier row
                row = rng.choice(kept)
            elif r < 0.15 and kept:  # near duplicate: a case/punctuation variant, or one word appended
                src = rng.choice(kept)
                answer = src["messages"][1]["content"]
                answer = answer.capitalize() + "!" if rng.random() < 0.5 else answer + " " + rng.choice(WORDS)
                row = {"messages": [src["messages"][0], {"role": "assistant", "content": answer}]}
            else:
                q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
                a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 40)))
                if rng.random() < 0.01:
                    a += f" contact user{i}@example.com or 10.0.{i % 250}.{i % 200}"
                row = {
                    "messages": [
                        {"role": "user", "content": f"Question {i}: {q}?"},
                        {"role": "assistant", "content": a},
                    ]
                }
                if len(kept) < 50_000:
                    kept.append(row)
                else:
                    kept[rng.randrange(len(kept))] = row
            if rng.random() < 0.002:
                f.write("{broken json\n")
            f.write(json.dumps(row) + "\n")


# -- the pandas baseline -----------------------------------------------------------------------------------------

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200d\ufeff]")
_USPACE = re.compile("[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_TRAIL = re.compile("[ \t]+\n")
_BLANKS = re.compile("\n{3,}")
_PII = [
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "<EMAIL>"),
    (
        re.compile(
            r"\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
            r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\b"
        ),
        "<IPV4>",
    ),
    (re.compile(r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)|[0-9]{2,4})[ .-][0-9]{3,4}[ .-][0-9]{3,4}\b"), "<PHONE>"),
]
_WORD_SPLIT = re.compile(r"[^\w]+")


def _norm(s: str) -> str:
    s = unicodedata.normalize("NFC", s).replace("\r\n", "\n").replace("\r", "\n")
    s = _USPACE.sub(" ", _CONTROL.sub("", s))
    return _BLANKS.sub("\n\n", _TRAIL.sub("\n", s)).strip(" \t\n")


def pandas_clean(src: Path, out: Path, eval_fraction: float = 0.1, threshold: float = 0.9) -> dict:
    import pandas as pd

    from lora_assets.clean import minhash_signatures, near_duplicate_of

    lines = src.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    df = pd.DataFrame({"line_no": np.arange(1, len(lines) + 1), "line": lines})

    def parse(line: str):
        try:
            j = json.loads(line)
        except ValueError:
            return None, "invalid_json"
        if not isinstance(j, dict):
            return None, "not_an_object"
        msgs = j.get("messages")
        if msgs is None:
            return None, "missing_fields"
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            return None, "wrong_type"
        return msgs, None

    parsed = df["line"].map(parse)
    df["messages"] = parsed.map(lambda p: p[0])
    df["reason"] = parsed.map(lambda p: p[1])

    def normalize(msgs):
        if msgs is None:
            return None
        out_msgs = []
        for m in msgs:
            text = _norm(m["content"])
            for pat, repl in _PII:
                text = pat.sub(repl, text)
            out_msgs.append({"role": m["role"].strip().lower(), "content": text})
        return out_msgs

    df["messages"] = df["messages"].map(normalize)

    def validate(msgs):
        if msgs is None:
            return None
        if not msgs:
            return "empty_conversation"
        if any(m["role"] not in ("system", "user", "assistant") for m in msgs):
            return "unknown_role"
        if any(m["role"] == "user" and not m["content"] for m in msgs):
            return "empty_prompt"
        if any(m["role"] == "assistant" and not m["content"] for m in msgs):
            return "empty_response"
        if not any(m["role"] == "user" for m in msgs):
            return "no_user_turn"
        if msgs[-1]["role"] != "assistant":
            return "no_final_assistant_turn"
        return None

    df["reason"] = df["reason"].fillna(df["messages"].map(validate))
    ok = df["reason"].isna()
    df["content_hash"] = df["messages"].map(
        lambda m: hashlib.md5(json.dumps(m).encode()).hexdigest() if m is not None else None
    )
    dup = ok & df.duplicated("content_hash")
    df.loc[dup, "reason"] = "duplicate"
    ok = df["reason"].isna()

    kept = df[ok]
    shingles = kept["messages"].map(
        lambda m: [
            hash(tuple(ws[i : i + 3])) & 0xFFFFFFFFFFFFFFFF
            for ws in [[w for w in _WORD_SPLIT.split(" ".join(x["content"] for x in m).lower()) if w]]
            for i in range(max(len(ws) - 2, 1))
        ]
    )
    rids = np.repeat(np.arange(len(kept)), shingles.map(len).to_numpy())
    hashes = np.fromiter((h for hs in shingles for h in hs), dtype=np.uint64, count=len(rids))
    dup_of = near_duplicate_of(minhash_signatures(rids, hashes), threshold)
    df.loc[kept.index[dup_of >= 0], "reason"] = "near_duplicate"
    ok = df["reason"].isna()

    bucket = df["content_hash"].map(lambda h: int(h[:8], 16) % 10_000 if isinstance(h, str) else -1)
    df["split"] = np.where(~ok, "quarantine", np.where(bucket < round(eval_fraction * 10_000), "eval", "train"))
    df["prompt_hash"] = df["messages"].map(
        lambda m: hashlib.md5(json.dumps(m[:-1]).encode()).hexdigest() if m is not None else None
    )
    train_prompts = set(df.loc[df["split"] == "train", "prompt_hash"])
    df.loc[(df["split"] == "eval") & df["prompt_hash"].isin(train_prompts), "split"] = "train"

    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        df.loc[df["split"] == split, ["messages", "content_hash"]].to_json(
            out / f"{split}.jsonl", orient="records", lines=True
        )
    df.loc[df["split"] == "quarantine", ["reason", "line_no", "line"]].to_json(
        out / "quarantine.jsonl", orient="records", lines=True
    )
    counts = df["split"].value_counts().to_dict()
    return {
        "rows_in": len(df),
        "rows_train": int(counts.get("train", 0)),
        "rows_eval": int(counts.get("eval", 0)),
        "rows_quarantined": int(counts.get("quarantine", 0)),
        "by_reason": {k: int(v) for k, v in df["reason"].value_counts().items()},
    }


def lorafoundry_clean(src: Path, out: Path) -> dict:
    from lora_assets.clean import clean_dataset
    from lora_assets.spec import DatasetSpec

    r = clean_dataset("bench", DatasetSpec(path=str(src)), src, out)
    return r.model_dump(include={"rows_in", "rows_train", "rows_eval", "rows_quarantined", "by_reason"})


def child(impl: str, src: Path, out: Path) -> None:
    t0 = time.perf_counter()
    result = (lorafoundry_clean if impl == "lorafoundry" else pandas_clean)(src, out)
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process only
    print(json.dumps(result))


def measure(impl: str, src: Path, out: Path) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", impl, "--src", str(src), "--out", str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed with {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--child", choices=["lorafoundry", "pandas"])
    ap.add_argument("--src", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.src, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        t0 = time.perf_counter()
        generate(src, args.rows)
        print(f"generated {args.rows:,} rows ({src.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        results = {}
        for impl in ("lorafoundry", "pandas"):
            results[impl] = measure(impl, src, Path(tmp) / impl)
            r = results[impl]
            print(
                f"{impl:12s} {r['wall_s']:7.1f} s  {args.rows / r['wall_s']:>10,.0f} rows/s  "
                f"peak RSS {r['peak_rss_mb']:,.0f} MB  train {r['rows_train']:,} eval {r['rows_eval']:,} "
                f"quarantined {r['rows_quarantined']:,} {r['by_reason']}"
            )
        ratio = results["pandas"]["wall_s"] / results["lorafoundry"]["wall_s"]
        lf_wall = results["lorafoundry"]["wall_s"]
        print(f"speed-up over pandas: {ratio:.1f}x (goal >= 5x); lorafoundry wall {lf_wall:.1f} s (goal <= 60 s)")


if __name__ == "__main__":
    main()
