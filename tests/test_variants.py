"""LoRA variants (spec key `variant`): rsLoRA, DoRA, PiSSA and OLoRA train with peft and are saved so that what is
served is what was trained: rsLoRA keeps `use_rslora` (vLLM reads it), PiSSA/OLoRA are converted to a plain LoRA on
the unchanged base, DoRA is refused by the multi-LoRA server with its fix (export it merged).

The real-server checks run on the session's vLLM server (tiny base): served greedy tokens equal peft's own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch

from lora_assets.base_model import resolve_base_model
from lora_assets.clean import clean_dataset, current_clean, read_split
from lora_assets.hardware import DTYPE_ENV, torch_dtype
from lora_assets.home import Home
from lora_assets.spec import AdapterSpec, DatasetSpec
from lora_assets.train import INITIAL_ADAPTER, _lora_model, _save_adapter, train_adapter
from serving.integrity import IntegrityError, multi_lora_problem, stage, verified_copy

SMALL = {"r": 4, "batch_size": 8, "learning_rate": 1e-3, "max_seq_len": 64}
# The served variants train this many steps, not the epoch's 225: what they check is that vLLM answers like peft
# with the same weights, which needs weights that move the answers well away from the base's, not a finished model.
# Measured (2026-12-04, bf16 training): the rsLoRA check's near/far is 0.007/0.78 after 60 steps (0.015/1.13 after
# the epoch) against the `near < far / 3` it asserts, and merged DoRA's greedy answers differ from the base's.
SERVED_STEPS = 60


@pytest.fixture(scope="module")
def data(random_base, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("variants")
    rows = [{"prompt": f"item {i}: what comes after {i}?", "completion": f"{i + 1}"} for i in range(48)]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    clean = clean_dataset(
        "d",
        DatasetSpec(path="d.jsonl"),
        root / "d.jsonl",
        root / "datasets",
        AutoTokenizer.from_pretrained(random_base),
    )
    return root, clean, resolve_base_model(str(random_base), root)


@pytest.fixture(scope="module")
def trained(data):
    """``trained(variant)``: that variant trained one epoch on the module's data, once for the module."""
    root, clean, base = data
    results = {}

    def train(variant: str):
        if variant not in results:
            spec = AdapterSpec(dataset="d", variant=variant, **SMALL)
            results[variant] = train_adapter(f"v-{variant}", spec, base, clean, Home.at(root))
        return results[variant]

    return train


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rslora", "dora", "pissa", "olora"])
def test_each_variant_trains_one_epoch_and_saves_what_serving_needs(trained, variant):
    result = trained(variant)
    out = Path(result.adapter_dir)
    config = json.loads((out / "adapter_config.json").read_text())
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["config"]["variant"] == variant
    assert result.steps == manifest["steps_per_epoch"] >= 1  # exactly one epoch
    assert config["use_rslora"] is (variant == "rslora")
    assert config["use_dora"] is (variant == "dora")
    if variant in ("pissa", "olora"):  # converted: a plain LoRA of rank 2r, nothing of the init left behind
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
        assert not (out / INITIAL_ADAPTER).exists()
    else:
        assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert (multi_lora_problem(out) is not None) is (variant == "dora")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_a_converted_adapter_on_the_unchanged_base_is_the_trained_model(
    data, random_base, tmp_path, monkeypatch, variant, dtype
):
    """PiSSA/OLoRA change the base's weights at init. The trained model (modified base + trained adapter) and the
    saved adapter on the original base give the same logits; the unconverted adapter on the original base does not.
    Checked in both number formats on every machine: fp32, and bf16, which GPUs and bf16 CPUs train in."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    # The base is trained and served in the format `auto` means (lora_assets.hardware); pin it, so the model under
    # test and the reference below are loaded in the same format, whatever this machine would pick.
    monkeypatch.setenv(DTYPE_ENV, dtype)
    _, _, base = data
    spec = AdapterSpec(dataset="d", variant=variant, **SMALL)
    torch.manual_seed(0)
    model, _, _ = _lora_model(spec, base, "lora")
    model.save_pretrained(tmp_path / INITIAL_ADAPTER)
    with torch.no_grad():  # stands in for training: move every adapter weight
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 7]])
    with torch.no_grad():
        trained = model(ids).logits.float()
    model.save_pretrained(tmp_path / "unconverted")
    _save_adapter(model, spec, tmp_path)

    def on_original_base(adapter_dir: Path, config=None) -> torch.Tensor:
        original = AutoModelForCausalLM.from_pretrained(random_base, dtype=torch_dtype(dtype))
        with torch.no_grad():
            return PeftModel.from_pretrained(original, adapter_dir, config=config).eval()(ids).logits.float()

    if dtype == "float32":
        atol = 1e-4  # fp32 rounding only (measured: 4e-7)
    else:
        # The two sides store the base to one bf16 rounding apart: PiSSA/OLoRA keep W - s*B0@A0 rounded to bf16
        # (a relative error of at most 2^-8 per weight); the converted adapter adds -s*B0@A0 to W in fp32. Each
        # side's bf16 forward is off its own fp32 forward by at most 1.75 ulp of the largest logit (measured over
        # 24 inits of both variants; ulp = bf16's spacing there, eps 2^-7 times 2^floor(log2 max|logit|), 2^-8
        # for these logits of ~0.6), so the two differ by at most ~3.5 ulp, and the weights' one rounding adds
        # less than the forward's own roundings: 4 ulp. Measured: at most 2.2 ulp.
        largest = float(trained.abs().max())
        atol = 4 * torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(largest))
    served = on_original_base(tmp_path)
    gap = float((served - trained).abs().max())
    assert gap <= atol, (dtype, gap, atol)
    # What a server reading the unconverted adapter as a plain LoRA would give: off by at least 65 ulp in bf16
    # (measured over the same 24 inits), so the bound above does tell a missing conversion.
    plain = PeftConfig.from_pretrained(tmp_path / "unconverted")
    plain.init_lora_weights = True
    unconverted = on_original_base(tmp_path / "unconverted", plain)
    assert float((unconverted - trained).abs().max()) > 4 * atol


def test_pissa_with_qlora_is_refused_in_the_spec():
    with pytest.raises(ValueError, match="variant pissa initialises the adapter"):
        AdapterSpec(dataset="d", variant="pissa", method="qlora")


@pytest.mark.slow
def test_the_workers_verified_copy_refuses_a_dora_adapter(trained, tmp_path):
    """The last check before vLLM reads the files, in its worker: a DoRA adapter is never loaded."""
    from registry.records import adapter_sha256

    result = trained("dora")
    sha = adapter_sha256(Path(result.adapter_dir))[0]
    staged = stage(Path(result.adapter_dir), sha, tmp_path / "stage")
    with pytest.raises(IntegrityError, match="DoRA adapter"):
        verified_copy(staged, tmp_path / "stage", tmp_path / "copy")


# --- on the session's real vLLM server ----------------------------------------------------------------------------


def _eval_prompts(session_home: Path, tokenizer, n: int = 8) -> list[list[int]]:
    rows = read_split(current_clean(session_home / "datasets", "categories"), "eval")[:n]
    texts = [
        tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def _peft_greedy(
    base_path: Path, adapter_dir: Path, prompts: list[list[int]], rslora: bool | None = None, disable: bool = False
):
    """peft's own greedy tokens; ``rslora`` overrides the adapter's scaling (the counterfactual); ``disable`` asks
    the base without the adapter."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    config = PeftConfig.from_pretrained(adapter_dir)
    if rslora is not None:
        config.use_rslora = rslora
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, config=config).eval()
    if disable:
        model.disable_adapter_layers()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p) :].tolist())
    return outs


def _served_greedy(url: str, model: str, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for p in prompts:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": p, "max_tokens": 12, "temperature": 0, "return_token_ids": True},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        outs.append(choice.get("token_ids") or choice["text"])
    return outs


def _peft_first_logprobs(base_path: Path, adapter_dir: Path, prompts: list[list[int]], rslora: bool) -> list:
    """peft's log-probabilities (fp32) of the first token after each prompt, with the adapter's scaling overridden."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    config = PeftConfig.from_pretrained(adapter_dir)
    config.use_rslora = rslora
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, config=config).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts]


def _served_first_logprobs(url: str, model: str, prompts: list[list[int]], k: int = 5) -> list[dict[int, float]]:
    """vLLM's top-``k`` log-probabilities of the first token after each prompt, by token id."""
    outs = []
    for p in prompts:
        r = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": model,
                "prompt": p,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": k,
                "return_tokens_as_token_ids": True,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        outs.append({int(t.removeprefix("token_id:")): lp for t, lp in top.items()})
    return outs


def _logprob_distance(served: list[dict[int, float]], peft: list) -> float:
    """Mean absolute difference over the tokens vLLM ranked in its top k."""
    gaps = [abs(lp - float(row[t])) for top, row in zip(served, peft, strict=True) for t, lp in top.items()]
    return sum(gaps) / len(gaps)


def _merged_dora_served_greedy(rec, session_home: Path, demo_spec, tmp_path: Path, prompts) -> list:
    """`lorafoundry registry export-merged` the DoRA version, then `lorafoundry serve` a spec whose base_model is the
    merged dir (a fresh home: no adapters), and ask it the prompts greedily."""
    import subprocess
    import sys

    from tests.conftest import free_port
    from tests.test_serve_command import stop_serve, wait_until_serving

    cli = Path(sys.executable).parent / "lorafoundry"
    out_dir = tmp_path / "variants-dora-merged"
    done = subprocess.run(
        [str(cli), "registry", "export-merged", f"variants@{rec.version}", str(out_dir), "--dtype", "float32"]
        + ["--home", str(session_home)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    port = free_port()
    spec = demo_spec.model_copy(
        update={
            "base_model": str(out_dir),
            "serving": demo_spec.serving.model_copy(update={"port": port, "base_model_name": "dora-merged"}),
        }
    )
    raw = spec.model_dump(mode="json")
    for name in raw["datasets"]:  # the spec file is written elsewhere: its data paths made absolute
        raw["datasets"][name]["path"] = str(demo_spec.dataset_path(name))
    spec_file = tmp_path / "merged.yaml"
    spec_file.write_text(json.dumps(raw))  # JSON is YAML
    proc = subprocess.Popen(
        [str(cli), "serve", str(spec_file), "--home", str(tmp_path / "merged-home")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = wait_until_serving(proc, port)
        assert proc.poll() is None, output[-4000:]
        models = {m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]}
        assert models == {"dora-merged"}
        return _served_greedy(f"http://127.0.0.1:{port}", "dora-merged", prompts)
    finally:
        stop_serve(proc)


@pytest.mark.slow
def test_served_variants_answer_like_peft_and_dora_is_refused_with_its_fix(
    vllm_server, served_registry, session_home, demo_spec, tmp_path
):
    """rsLoRA and PiSSA adapters trained on the session's tiny base, registered and asked for as name@VERSION: the
    served greedy tokens equal peft's (and the rsLoRA weights read with plain alpha/r scaling answer otherwise, so
    a server that ignored `use_rslora` would fail this). A DoRA adapter is refused up front with the fix; following
    the fix (`registry export-merged`, then `lorafoundry serve` on the merged dir as the base) serves peft's
    DoRA answers."""
    from transformers import AutoTokenizer

    from lora_assets.pipeline import Pipeline
    from registry.records import NewAdapter

    pipe = Pipeline(demo_spec, session_home)
    base, clean = pipe.base, current_clean(session_home / "datasets", "categories")
    reg = served_registry
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    prompts = _eval_prompts(session_home, tokenizer)
    url = vllm_server["url"]
    registered = []
    trained = {}
    for variant in ("rslora", "pissa", "dora"):
        spec = AdapterSpec(
            dataset="categories", variant=variant, r=8, learning_rate=2e-3, max_seq_len=128, max_steps=SERVED_STEPS
        )
        result = train_adapter(f"variants-{variant}", spec, base, clean, pipe.layout)
        rec = reg.register(
            NewAdapter(
                name="variants",
                path=result.adapter_dir,
                base_model=demo_spec.base_model,
                base_model_hash=base.content_hash,
                training_config={"variant": variant},
            )
        )
        registered.append(rec)
        trained[variant] = (rec, Path(result.adapter_dir))

    for variant in ("rslora", "pissa"):
        rec, adapter_dir = trained[variant]
        served = _served_greedy(url, f"variants@{rec.version}", prompts)
        want = _peft_greedy(base.path, adapter_dir, prompts)
        if isinstance(served[0], str):  # a vLLM without token ids in the answer: compare the text
            want = [tokenizer.decode(w, skip_special_tokens=True) for w in want]
        same = sum(s == w for s, w in zip(served, want, strict=True))
        assert same >= len(prompts) - 1, (variant, same, served, want)
    # vLLM applies rsLoRA's scale (alpha/sqrt(r)), not plain LoRA's (alpha/r): its log-probabilities of the
    # first token are nearer peft's with rsLoRA than without. Compared on log-probabilities, not greedy tokens:
    # a well-trained adapter can give the same greedy tokens at both scales (seen with bf16 training on an
    # AVX-512-BF16 EPYC), while the runner-up tokens' log-probabilities still move by nats.
    rec, adapter_dir = trained["rslora"]
    served = _served_first_logprobs(url, f"variants@{rec.version}", prompts)
    near = _logprob_distance(served, _peft_first_logprobs(base.path, adapter_dir, prompts, rslora=True))
    far = _logprob_distance(served, _peft_first_logprobs(base.path, adapter_dir, prompts, rslora=False))
    assert near < far / 3, (near, far)  # bf16 serving moves log-probabilities by hundredths, the scale by nats

    rec, _ = trained["dora"]
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": f"variants@{rec.version}", "prompt": "hi", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "VariantNotServable", r.text
    assert "export-merged" in r.json()["error"]["message"]
    listed = {e["id"] for e in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
    assert f"variants@{trained['rslora'][0].version}" in listed and f"variants@{rec.version}" not in listed
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # still serving

    # the fix the refusal names: export the DoRA version merged, serve that dir as vLLM's --model
    _, dora_dir = trained["dora"]
    merged = _merged_dora_served_greedy(rec, session_home, demo_spec, tmp_path, prompts)
    want = _peft_greedy(base.path, dora_dir, prompts)
    if isinstance(merged[0], str):
        want = [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    same = sum(s == w for s, w in zip(merged, want, strict=True))
    assert same >= len(prompts) - 1, ("merged dora", same, merged, want)
    assert want != _peft_greedy(base.path, dora_dir, prompts, disable=True)  # DoRA did change the answers


def test_plain_lora_keeps_its_run_key_and_code_version_and_a_variant_changes_them(demo_spec):
    """Homes trained before `variant` existed reuse their runs and show nothing stale; a variant is another run."""
    from lora_assets.train import run_config
    from orchestration.assets import build_assets

    assert "variant" not in run_config(AdapterSpec(dataset="d"))
    assert run_config(AdapterSpec(dataset="d", variant="rslora"))["variant"] == "rslora"

    def train_version(spec) -> str:
        versions = {k.to_user_string(): v for a in build_assets(spec) for k, v in a.code_versions_by_key.items()}
        return versions["adapter/categories/train"]

    adapters = dict(demo_spec.adapters)
    rslora = demo_spec.model_copy(
        update={"adapters": adapters | {"categories": adapters["categories"].model_copy(update={"variant": "rslora"})}}
    )
    assert train_version(rslora) != train_version(demo_spec)
