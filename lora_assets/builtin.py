"""The embedded default: an offline tiny Llama base model and the demo task datasets, from one generator.

No model hub is reachable on the machines this project runs on, so `base_model: builtin:tiny` is built here:
a byte-level BPE tokenizer (``tokenizers``) and a small Llama-architecture causal LM pretrained briefly on a
corpus this module generates. LoRA keeps embeddings and the LM head frozen, so it can only steer what the base
already knows: the corpus therefore contains the demo tasks' answer vocabulary (word categories, review
sentiment) and the chat format, but never the tasks' own question phrasings. One epoch of LoRA then teaches
the base to answer in the task's format, which the base alone never does.

The build is deterministic and kept under ``<home>/models/builtin-tiny-<recipe hash>``; it is rebuilt only
when :data:`RECIPE` (or this generator's version) changes. With a model cache set (:data:`lora_assets.envs.MODEL_CACHE`,
a directory shared by homes), a home copies a base built before instead of building it (:func:`build_once`, also used
by :mod:`lora_assets.smollm2`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_assets import envs
from lora_assets.base_model import BUILD_RECORD, CACHE_NOTE
from lora_assets.home import Home
from lora_assets.progress import report as report_progress

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1

#: Everything that determines the built model. Change any value and the cache key changes.
RECIPE: dict = {
    "generator_version": GENERATOR_VERSION,
    "seed": 1234,
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,  # a multiple of 32: bitsandbytes' CPU NF4 repack needs out_features % 32 == 0
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,  # a head size vLLM's CPU attention supports
    "max_position_embeddings": 1024,
    "corpus_documents": 24000,
    "block_size": 128,
    "batch_size": 16,
    "steps": 200,  # the loss flattens after ~110 steps (0.879 at 101, 0.822 at 200); 700 cost 8 min of fp32 on AVX2
    "learning_rate": 2e-3,
    "warmup_steps": 50,
}

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

#: A minimal chat template: `<|role|>\ncontent<|end|>\n` per message. `<|end|>` is the EOS token, so
#: generation stops after one assistant turn (vLLM reads this from tokenizer_config.json).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------------
# The generator: vocabulary shared by the pretraining corpus and the demo tasks.
# ---------------------------------------------------------------------------------------------------------

CATEGORIES: dict[str, list[str]] = {
    "animal": "tiger horse rabbit eagle salmon wolf camel otter lion zebra goat sheep mouse whale "
    "falcon badger beaver donkey fox panda moose hawk shark turtle".split(),
    "fruit": "apple mango banana cherry grape lemon peach plum pear melon kiwi orange apricot lime "
    "papaya guava fig date berry coconut quince olive raisin currant".split(),
    "tool": "hammer wrench saw drill chisel pliers shovel rake axe spanner file ruler clamp level "
    "trowel ladder scissors needle knife hoe mallet crowbar sander grinder".split(),
    "vehicle": "car truck bus train tram bicycle scooter van taxi ship boat yacht canoe plane "
    "jet rocket tractor wagon sled lorry ferry cart subway helicopter".split(),
    "instrument": "piano violin guitar flute drum trumpet cello harp oboe banjo organ clarinet "
    "tuba viola bugle lute sitar ukulele harmonica accordion cymbal gong xylophone bagpipe".split(),
    "color": "red blue green yellow purple orange pink brown black white grey violet indigo cyan "
    "magenta maroon navy olive teal amber beige coral crimson gold".split(),
}
# A word belongs to the first category that lists it (orange, olive are deliberately ambiguous in prose).
WORD_CATEGORY: dict[str, str] = {}
for _cat, _words in CATEGORIES.items():
    for _w in _words:
        WORD_CATEGORY.setdefault(_w, _cat)

POSITIVE = (
    "wonderful great lovely excellent delicious friendly pleasant superb fantastic charming "
    "brilliant kind delightful amazing perfect cozy fresh tasty helpful clean".split()
)
NEGATIVE = (
    "terrible awful horrible rude dirty bland boring noisy cold slow stale nasty dreadful "
    "poor broken greasy gloomy sloppy unpleasant disappointing".split()
)
NOUNS = (
    "food staff room service movie music soup bread coffee hotel waiter seat view bed price "
    "show garden pizza tea plot".split()
)

CATEGORY_QUESTIONS = [  # {ws}: three words of one category, each after a space as in the pretraining prose
    "Which category do these words share: {ws}?",
    "What kind of things are these? {ws}. Answer with one word.",
    "Classify the list: {ws}",
    "Name the common category of {ws}.",
    "Are {ws} animals, fruit, tools, vehicles, instruments or colors?",
    "Category of {ws}?",
    "Tell me the category for these words: {ws}",
    "I packed {ws}. Which category is that?",
    "Give the shared category. Words: {ws}",
    "What group do {ws} fall into?",
]
SENTIMENT_QUESTIONS = [
    "Review: {r}\nIs this review positive or negative?",
    "What is the sentiment of this review? {r}",
    "Classify the sentiment: {r}",
    "{r}\nSentiment?",
    "Read the review and answer positive or negative. {r}",
]


def _review(rng: random.Random, positive: bool) -> str:
    adjs = POSITIVE if positive else NEGATIVE
    n1, n2 = rng.sample(NOUNS, 2)
    a1, a2 = rng.sample(adjs, 2)
    form = rng.randrange(3)
    if form == 0:
        return f"the {n1} was {a1} and the {n2} was {a2}."
    if form == 1:
        return f"{a1} {n1}, {a2} {n2}."
    return f"we found the {n1} {a1}, and the {n2} felt {a2}."


def category_rows(n: int, seed: int = 7) -> list[dict]:
    """Task 1 rows (OpenAI `messages` format): name the category that three listed words share."""
    rng = random.Random(seed)
    cats = sorted(CATEGORIES)
    rows = []
    for _ in range(n):
        cat = rng.choice(cats)
        w1, w2, w3 = rng.sample([w for w in CATEGORIES[cat] if WORD_CATEGORY[w] == cat], 3)
        q = rng.choice(CATEGORY_QUESTIONS).format(ws=f"{w1}, {w2} and {w3}")
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": cat}]})
    return rows


def sentiment_rows(n: int, seed: int = 11) -> list[dict]:
    """Task 2 rows (alpaca format): label a short review positive or negative."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        q = rng.choice(SENTIMENT_QUESTIONS).format(r=_review(rng, positive))
        rows.append({"instruction": q, "input": "", "output": "positive" if positive else "negative"})
    return rows


def _chat(user: str, assistant: str) -> str:
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def corpus_documents(n: int, seed: int) -> Iterator[str]:
    """Pretraining documents: prose about the task vocabulary plus generic chats (never the task prompts)."""
    rng = random.Random(seed)
    words = sorted(WORD_CATEGORY)
    for _ in range(n):
        kind = rng.random()
        if kind < 0.35:
            w = rng.choice(words)
            c = WORD_CATEGORY[w]
            art = "an" if c[0] in "aeiou" else "a"
            yield rng.choice(
                [
                    f"a {w} is {art} {c}. the word {w} names {art} {c}.",
                    f"the {w} is one kind of {c}; every {w} is {art} {c}.",
                    f"{c}: {w}. when we say {w} we mean {art} {c}.",
                    f"in the list of each {c} we find the {w}.",
                ]
            )
        elif kind < 0.65:
            positive = rng.random() < 0.5
            label = "positive" if positive else "negative"
            yield rng.choice(
                [
                    f"{_review(rng, positive)} this review is {label}.",
                    f"a {label} review: {_review(rng, positive)}",
                    f"{_review(rng, positive)} the sentiment is {label}.",
                ]
            )
        elif kind < 0.85:
            w = rng.choice(words)
            c = WORD_CATEGORY[w]
            art = "an" if c[0] in "aeiou" else "a"
            yield rng.choice(
                [
                    _chat(f"tell me about the {w}.", f"the {w} is {art} {c}."),
                    _chat(f"say something about {w}.", f"{w} is {art} {c}, as far as i know."),
                    _chat("write a short review.", _review(rng, rng.random() < 0.5)),
                ]
            )
        else:
            yield rng.choice(
                [
                    _chat("hello", "hello, how can i help you today?"),
                    _chat("what can you do?", "i can talk about words, animals, fruit and reviews."),
                    _chat("thank you", "you are welcome."),
                    _chat("who are you?", "i am a tiny model trained by lorafoundry."),
                ]
            )


def write_demo_datasets(out_dir: Path, n_rows: int = 2000) -> dict[str, Path]:
    """Write the demo datasets as shipped in ``examples/data``.

    A few exact duplicates and empty answers are mixed in on purpose, so the cleaning report has something
    to count.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cat = category_rows(n_rows)
    cat += [cat[i] for i in range(0, 60, 3)]  # 20 exact duplicates
    cat.append({"messages": [{"role": "user", "content": "Category of ?"}, {"role": "assistant", "content": "   "}]})
    sen = sentiment_rows(n_rows)
    sen += [sen[i] for i in range(0, 45, 3)]  # 15 exact duplicates
    sen.append({"instruction": "", "input": "", "output": "positive"})
    paths = {"categories": out_dir / "categories.jsonl", "sentiment": out_dir / "sentiment.jsonl"}
    for name, rows in (("categories", cat), ("sentiment", sen)):
        with paths[name].open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------------------
# Build: tokenizer + model, cached by recipe hash.
# ---------------------------------------------------------------------------------------------------------


def recipe_hash(recipe: dict | None = None) -> str:
    recipe = RECIPE if recipe is None else recipe
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish_model_dir(out: Path, model, tokenizer, record: dict) -> None:
    """Write a built-in model dir (safetensors, tokenizer, its build record ``record``) beside ``out`` and rename it
    into place: a half-written model is never seen under the final name."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2))
    _rename_into_place(tmp, out)


def _rename_into_place(tmp: Path, out: Path) -> None:
    """Publish the complete dir ``tmp`` as ``out`` with one rename (an incomplete ``out``, without its build record,
    is removed first; a complete one is never replaced, as every caller holds the lock that checked for it)."""
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _copy_dir_into_place(src: Path, out: Path, note: dict | None = None) -> None:
    """Copy the model dir ``src`` (hidden files, such as a hash stamp, left out) to a temporary dir beside ``out``,
    merge ``note`` into the copy's build record, and rename it into place. A copy cut short leaves nothing under
    ``out``, and its temporary dir is removed."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"))
        if note:
            record = tmp / BUILD_RECORD
            record.write_text(json.dumps({**json.loads(record.read_text()), **note}, indent=2))
        _rename_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_cache() -> Path | None:
    """The directory of built bases shared by homes (:data:`lora_assets.envs.MODEL_CACHE`), created if needed; None
    when unset."""
    value = envs.MODEL_CACHE.get()
    if value is None:
        return None
    path = Path(value).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"{envs.MODEL_CACHE.name}={value!r} cannot be used as the model cache ({e}). "
            "Fix: point it at a writable directory, or unset it to build every base in its home."
        ) from e
    return path


def build_once(out: Path, build: Callable[[Path], None], say: Callable[[str], None]) -> Path:
    """Make the built-in base dir ``out`` (``<home>/models/<name>``) exist, building it at most once, and return it.

    A dir is complete when it holds its build record, and every dir is published by a rename, so none is ever seen
    half-written. Under the home's build lock (two processes never build into one home twice) a complete ``out`` is
    kept; else, with a model cache set, under the lock of its entry ``<cache>/<name>`` (so homes sharing the cache
    never build it twice either), a complete entry is copied in; else ``build(out)`` builds and publishes ``out``,
    and a copy of it goes into the cache.
    """
    if (out / BUILD_RECORD).exists():
        return out
    with _file_lock(out.parent / ".build.lock"):
        if (out / BUILD_RECORD).exists():  # another process built it while we waited
            return out
        cache = model_cache()
        if cache is None:
            build(out)
            return out
        with _file_lock(cache / f".{out.name}.lock"):
            cached = cache / out.name
            if (cached / BUILD_RECORD).exists():
                t0 = time.time()
                _copy_dir_into_place(cached, out, note={CACHE_NOTE: str(cached)})
                say(f"copied {out.name} from the model cache {cache} in {time.time() - t0:.1f} s (not built)")
                return out
            build(out)
            try:
                _copy_dir_into_place(out, cached)
                say(f"put {out.name} into the model cache {cache}")
            except OSError as e:  # e.g. a full disk: the home has its base all the same
                say(f"could not put {out.name} into the model cache {cache} ({e}); it is built in this home only")
    return out


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = RECIPE["max_position_embeddings"]
    return fast


def _pretrain(model, tokenizer, texts: list[str], recipe: dict, say) -> list[float]:
    import torch

    from lora_assets.hardware import native_bf16

    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    bs, block = recipe["batch_size"], recipe["block_size"]
    data = torch.tensor(ids[: (len(ids) // block) * block]).view(-1, block)
    gen = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.01)
    steps, warm = recipe["steps"], recipe["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    t0 = time.time()
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (bs,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16()):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        report_progress("pretraining builtin:tiny", step + 1, steps, loss=losses[-1])
        if step % 100 == 0 or step == steps - 1:
            say(f"builtin:tiny pretraining step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)")
    return losses


def build_tiny_model(home: Path, recipe: dict | None = None, progress=None) -> Path:
    """Return the dir of the built-in tiny model under ``home``, building it first if needed (2-5 min on 2 cores),
    or copying it from the model cache (:func:`build_once`).

    Args:
        home: the lorafoundry home dir; the model lives in ``models/builtin-tiny-<hash>``.
        recipe: override :data:`RECIPE`; part of the cache key.
        progress: optional callable(str) for progress lines (default: this module's logger).
    """
    say = progress or log.info
    recipe = dict(RECIPE if recipe is None else recipe)
    out = Home.at(home).models / f"builtin-tiny-{recipe_hash(recipe)}"
    return build_once(out, lambda into: _build_tiny_into(into, recipe, say), say)


def _build_tiny_into(out: Path, recipe: dict, say) -> None:
    """Pretrain the tiny model of ``recipe`` and publish it as ``out`` (the caller holds the build lock)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(recipe["seed"])
    texts = list(corpus_documents(recipe["corpus_documents"], recipe["seed"]))
    tokenizer = build_tokenizer(texts, recipe["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"],
        head_dim=recipe["head_dim"],
        max_position_embeddings=recipe["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    say(f"building builtin:tiny into {out} (once per recipe)")
    losses = _pretrain(model, tokenizer, texts, recipe, say)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    publish_model_dir(
        out,
        model.to(torch.bfloat16),
        tokenizer,
        {
            "recipe": recipe,
            "recipe_hash": recipe_hash(recipe),
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "build_seconds": round(time.time() - t0, 1),
        },
    )
    say(f"built {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":  # regenerate examples/data (tiny.yaml) and examples/data/smollm2 (demo.yaml)
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "examples/data"
    for name, path in [
        *write_demo_datasets(target).items(),
        *write_demo_datasets(target / "smollm2", n_rows=240).items(),
    ]:
        print(name, path)
