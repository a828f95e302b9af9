"""The train split as batches: tokenized once per (data, tokenizer, chat template, length) into the home's token
cache, then collated per batch, packed into rows (:class:`PackingCollator`) or padded (:class:`PaddedCollator`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from lora_assets.base_model import BaseModelRef
from lora_assets.chat import tokenize_example
from lora_assets.clean import CleanReport, read_split

#: Part of the token cache's key: raise it when tokenization changes, so no cached split of the old kind is read.
TOKENIZE_VERSION = 1


def attention_width(config: dict) -> float:
    """The row width at which one token's attention costs as much as its projections, from a model's config.

    Per token and layer the projections cost 2 * (their parameters) FLOPs and attention over a row of width W
    costs 4 * heads * head_dim * W; masked attention on CPU runs at about half the projections' FLOP rate
    (measured: SmolLM2-135M), hence the factor 2.
    """
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads)
    projections = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * config.get("intermediate_size", 4 * hidden)
    return 2 * projections / (4 * heads * head_dim) / 2


class PackingCollator:
    """Collate a batch by packing its examples into rows of at most ``max_len`` tokens.

    The batch holds the same examples as a padded one (the sampler is unchanged), so the optimization is the
    same; only the padding goes. ``position_ids`` restart at 0 for every example and no ``attention_mask`` is
    passed, from which transformers builds a block-diagonal causal mask: an example never attends to another.
    Padding at the end of a row forms its own segment and carries no loss.

    The row width is chosen per batch by cost, not fixed at ``max_len``: attention runs over a whole row with a
    block-diagonal mask, so its cost grows with the width squared while the projections' cost grows with the
    tokens fed. Each candidate width (the longest example times 1, 2, 4, 8, and ``max_len``) is packed, and the one
    with the least ``rows * width * (1 + width / attention_width)`` is used. ``attention_width`` is the row width
    at which a token's attention costs as much as its projections (see :func:`attention_width`). Measured on
    SmolLM2-135M with ~50-token chats: one 376-token row spent 12% of the step in attention, rows of the longest
    example 2%, at the same padding.
    """

    def __init__(self, pad_id: int, max_len: int, attention_width: float = 1024.0) -> None:
        self.pad_id, self.max_len, self.attention_width = pad_id, max_len, attention_width
        self.real_tokens = 0
        self.row_tokens = 0

    @staticmethod
    def _first_fit_decreasing(features: list[dict], width: int) -> list[list[dict]]:
        # Longest first, each into the first row with room: fewer, fuller rows than filling rows in arrival order
        # when lengths vary; the order inside a row does not matter to the loss.
        rows: list[list[dict]] = []
        used: list[int] = []
        for f in sorted(features, key=lambda f: -len(f["input_ids"])):
            n = len(f["input_ids"])
            i = next((i for i, u in enumerate(used) if u + n <= width), None)
            if i is None:
                rows.append([f])
                used.append(n)
            else:
                rows[i].append(f)
                used[i] += n
        return rows

    def _cost(self, rows: list[list[dict]]) -> float:
        width = max(sum(len(x["input_ids"]) for x in row) for row in rows)
        return len(rows) * width * (1 + width / self.attention_width)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        widths = sorted({min(self.max_len, max(longest, longest * k)) for k in (1, 2, 4, 8)} | {self.max_len})
        rows = min((self._first_fit_decreasing(features, w) for w in widths if w >= longest), key=self._cost)
        width = max(sum(len(x["input_ids"]) for x in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for f in row:
                n = len(f["input_ids"])
                ids[i, at : at + n] = torch.tensor(f["input_ids"])
                labels[i, at : at + n] = torch.tensor(f["labels"])
                labels[i, at] = -100  # never predict an example's first token from the previous example
                pos[i, at : at + n] = torch.arange(n)
                at += n
            pos[i, at:] = torch.arange(width - at)
        self.real_tokens += sum(len(f["input_ids"]) for f in features)
        self.row_tokens += ids.numel()
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


class PaddedCollator:
    """Pad each batch to its longest example (``packing: false``), counting real and fed tokens like
    :class:`PackingCollator` so both report a padding fraction and tokens/s."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorForSeq2Seq

        self._pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.real_tokens = 0
        self.row_tokens = 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self._pad([{k: v for k, v in f.items() if k != "length"} for f in features])
        self.real_tokens += int(batch["attention_mask"].sum())
        self.row_tokens += batch["attention_mask"].numel()
        return batch


def tokenized_train_split(
    tokenizer, base: BaseModelRef, clean: CleanReport, max_seq_len: int, cache_dir: Path
) -> tuple[list[dict], bool]:
    """The train split tokenized (labels masked to assistant tokens), cached on disk. Returns (examples, hit).

    Keyed by the dataset fingerprint, the tokenizer files and chat template, and max_seq_len, so adapters and
    sweep points on the same data tokenize once. Stored as plain int32 arrays in an .npz (no pickles).
    """
    import numpy as np

    tok_files = sorted(f for f in Path(base.path).glob("*") if f.name.startswith(("tokenizer", "special_tokens")))
    h = hashlib.sha256(
        json.dumps(
            [clean.fingerprint, max_seq_len, TOKENIZE_VERSION, str(getattr(tokenizer, "chat_template", ""))]
        ).encode()
    )
    for f in tok_files:
        h.update(f.name.encode() + f.read_bytes())
    path = Path(cache_dir) / f"{h.hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            ids, labels, offsets = z["ids"], z["labels"], z["offsets"]
        return [
            {"input_ids": ids[a:b].tolist(), "attention_mask": [1] * int(b - a), "labels": labels[a:b].tolist()}
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        ], True
    rows = read_split(clean, "train")
    examples = [tokenize_example(tokenizer, r["messages"], max_seq_len, r.get("tools")) for r in rows]
    examples = [e for e in examples if any(t != -100 for t in e["labels"])]  # nothing to learn from
    offsets = np.cumsum([0] + [len(e["input_ids"]) for e in examples])
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp name of its own, like lora_assets.files.write_json_atomic: sweep points on the same data may
    # tokenize at once, and a shared temp file would interleave their writes.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                ids=np.array([t for e in examples for t in e["input_ids"]], dtype=np.int32),
                labels=np.array([t for e in examples for t in e["labels"]], dtype=np.int32),
                offsets=offsets,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; keep what np.savez on a path would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return examples, False
