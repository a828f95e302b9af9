"""Adapter files are checked where they enter the registry (register, `registry register`, import): a safetensors
header that parses within bounds, float tensors named and shaped as the adapter config and the base say. Files a
server could not start with never become a version; real peft adapters of every variant the project trains do."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from registry import adapter_files
from registry.adapter_files import (
    MAX_HEADER_BYTES,
    check_adapter_files,
    nonfinite_tensor,
    read_adapter_config,
    read_safetensors_header,
)
from registry.errors import RegistryInputError
from registry.portable import export_registry, import_registry
from registry.records import NewAdapter, adapter_sha256
from registry.store import AdapterRegistry

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (``length`` to lie about it), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensor_file(tensors: dict[str, tuple[str, list[int]]], dtype_bytes: int = 4) -> bytes:
    """A well-formed file with these (dtype, shape) tensors, in order, zero-filled."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = dtype_bytes
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors_bytes(header, b"\0" * offset)


def fake_adapter(path: Path, weights: bytes, config: dict | str = CONFIG) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
ONE_TENSOR = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "too short for the 8-byte header length"),
        (b"\x10\0\0", "too short for the 8-byte header length"),
        (safetensors_bytes(b"{}", length=200), "header length 200 is larger than the file (10 bytes)"),
        (safetensors_bytes(b"{}", length=2**63), f"is over the {MAX_HEADER_BYTES} allowed"),
        (safetensors_bytes(b"not json"), "the safetensors header is not valid JSON"),
        (safetensors_bytes(b"\xff\xfe{}"), "not valid JSON"),
        (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
        (safetensors_bytes(b"[1, 2]"), "is JSON list, not an object"),
        (safetensors_bytes(b'{"__metadata__": {"a": NaN}}'), "non-finite number NaN"),
        (safetensors_bytes(b'{"__metadata__": {"a": 1e999}}'), "non-finite number 1e999"),
        (safetensors_bytes(b'{"__metadata__": {"a": 1}}'), "__metadata__ is not an object of strings"),
        (safetensors_bytes(b'{"x": {}, "x": {}}'), "duplicate key 'x'"),
        (safetensors_bytes({"x": {"dtype": "F32", "shape": [2]}}), "is not {dtype, shape, data_offsets}"),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "dtype": "F128"}}, b"\0" * 8), "unknown dtype 'F128'"),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "shape": [-2]}}, b"\0" * 8), "not a list of non-negative"),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "shape": [2.0]}}, b"\0" * 8), "not a list of non-negative"),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "shape": [True]}}, b"\0" * 8), "not a list of non-negative"),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "data_offsets": [0]}}, b"\0" * 8), "not [begin, end]"),
        (safetensors_bytes(ONE_TENSOR, b"\0" * 4), "ends at data byte 8, beyond the file's 4 (a truncated file?)"),
        (
            safetensors_bytes({"x": {**ONE_TENSOR["x"], "data_offsets": [0, 2**70]}}, b"\0" * 8),
            "beyond the file's 8",
        ),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "data_offsets": [4, 12]}}, b"\0" * 12), "starts at data byte 4"),
        (safetensors_bytes({"x": {**ONE_TENSOR["x"], "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8 bytes"),
        (
            safetensors_bytes({"x": {**ONE_TENSOR["x"], "shape": [10**30, 10**30]}}, b"\0" * 8),
            "needs more than the file holds",
        ),
        (safetensors_bytes(ONE_TENSOR, b"\0" * 9), "data ends at byte 8 of 9: the file has trailing bytes"),
    ],
    ids=lambda v: v[:40].decode(errors="replace") if isinstance(v, bytes) else None,
)
def test_the_header_parser_refuses_what_safetensors_would(tmp_path, content, needle):
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(content)
    with pytest.raises(RegistryInputError) as e:
        read_safetensors_header(f)
    assert needle in str(e.value) and str(f) in str(e.value) and "Fix:" in str(e.value)


def test_the_header_parser_reads_what_the_safetensors_library_writes(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.zeros(0)}, f, {"k": "v"})
    got = {name: (t.dtype, list(t.shape)) for name, t in read_safetensors_header(f).items()}
    with safe_open(f, "pt") as st:
        want = {name: (st.get_slice(name).get_dtype(), st.get_slice(name).get_shape()) for name in st.keys()}
    assert got == want == {"a": ("F32", [3, 5]), "b": ("BF16", [7]), "c": ("F32", [0])}


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    f = tmp_path / "adapter_model.safetensors"
    os.mkfifo(f)
    with pytest.raises(RegistryInputError, match="is not a regular file"):
        read_safetensors_header(f)


@pytest.mark.parametrize(
    "config, needle",
    [
        ("{not json", "is not valid JSON"),
        ("[1]", "JSON list, not an object"),
        ('{"peft_type": "LORA", "r": NaN}', "non-finite number NaN"),
        ({**CONFIG, "peft_type": "IA3"}, "peft_type is 'IA3'; only LORA"),
        ({**CONFIG, "r": 0}, "r is 0, not a positive integer"),
        ({**CONFIG, "r": "4"}, "r is '4', not a positive integer"),
        ({**CONFIG, "r": True}, "r is True, not a positive integer"),
        ({**CONFIG, "r": 4.0}, "r is 4.0, not a positive integer"),
        ({k: v for k, v in CONFIG.items() if k != "lora_alpha"}, "lora_alpha is None, not a positive number"),
        ({**CONFIG, "target_modules": []}, "target_modules is [], not a list of module names"),
        ({**CONFIG, "target_modules": None}, "target_modules is None"),
        ({**CONFIG, "target_modules": ["q_proj", 3]}, "not a list of module names"),
        ({**CONFIG, "rank_pattern": {"q_proj": 0}}, "rank_pattern is {'q_proj': 0}"),
        ({**CONFIG, "modules_to_save": "lm_head"}, "modules_to_save is 'lm_head'"),
        ("{" + '"pad": "' + "x" * (1 << 20) + '"}', "over 1048576 bytes"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_adapter_config_problems_are_clean_input_errors(tmp_path, config, needle):
    d = fake_adapter(tmp_path / "a", b"", config)
    with pytest.raises(RegistryInputError) as e:
        read_adapter_config(d / "adapter_config.json")
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "tensors, config, needle",
    [
        ({A: ("I32", [4, 64])}, CONFIG, f"tensor {A!r} has dtype I32, not a float type"),
        ({"model.layers.0.q_proj.lora_A.weight": ("F32", [4, 64])}, CONFIG, "is not one of this adapter's"),
        ({A.replace("q_proj", "k_proj"): ("F32", [4, 64])}, CONFIG, "is not one of this adapter's"),
        ({A.replace("lora_A", "lora_C"): ("F32", [4, 64])}, CONFIG, "is not one of this adapter's"),
        ({A: ("F32", [8, 64]), B: ("F32", [64, 8])}, CONFIG, f"tensor {A!r} has shape [8, 64], so rank 8"),
        ({A: ("F32", [4, 64]), B: ("F32", [64, 8])}, CONFIG, f"tensor {B!r} has shape [64, 8], so rank 8"),
        ({A: ("F32", [4, 64, 1])}, CONFIG, "not a 2-D LoRA matrix"),
        (
            {A: ("F32", [2, 64]), B: ("F32", [64, 4])},
            {**CONFIG, "rank_pattern": {"k_proj": 2}},
            f"tensor {B!r} has shape [64, 4], expected [64, 2] from lora_A's rank 2",
        ),
        (
            {
                A: ("F32", [4, 64]),
                B: ("F32", [64, 4]),
                A.replace("lora_A.weight", "lora_magnitude_vector"): ("F32", [32]),
            },
            CONFIG,
            "has shape [32], expected [64] from lora_B's output size",
        ),
        ({}, CONFIG, "holds no tensors"),
        ({"base_model.model.lm_head.weight": ("F32", [10, 64])}, {**CONFIG, "modules_to_save": ["lm_head"]}, "no LoRA"),
    ],
    ids=lambda v: str(v)[:60],
)
def test_tensors_that_do_not_fit_the_config_are_refused_by_name(tmp_path, tensors, config, needle):
    d = fake_adapter(tmp_path / "a", tensor_file(tensors), config)
    with pytest.raises(RegistryInputError) as e:
        check_adapter_files(d)
    assert needle in str(e.value) and str(d / "adapter_model.safetensors") in str(e.value)


def test_a_regex_target_modules_is_accepted_and_stored_as_one_name(tmp_path):
    """peft's regex form is never run (a crafted pattern could take exponential time), and is stored as a list."""
    d = fake_adapter(tmp_path / "a", tensor_file({A: ("F32", [4, 64])}), {**CONFIG, "target_modules": "(a+)+$"})
    assert check_adapter_files(d)["target_modules"] == ["(a+)+$"]


# -- values: NaN and infinity are refused where files enter -----------------------------------------------------


def lora_weights(dtype, a=None, b=None):
    """A real (safetensors library) file of one LoRA module in ``dtype``: A [4, 8], B [8, 4], finite unless values
    are given as {(row, col): value}."""
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = {A: torch.randn(4, 8, generator=g).to(dtype), B: torch.randn(8, 4, generator=g).to(dtype)}
    for name, values in ((A, a), (B, b)):
        for where, v in (values or {}).items():
            tensors[name][where] = v
    return tensors


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_that_is_not_finite_is_refused_by_name_in_every_float_dtype(tmp_path, dtype, bad):
    """vLLM's loader does not look at values, and a served NaN weight makes every answer of its adapter (and on CPU
    of the tokens batched with it, were its columns not masked) NaN: refused at registration, naming the tensor."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype)
    finite = lora_weights(dtype, b={(7, 3): torch.finfo(dtype).max, (0, 0): torch.finfo(dtype).tiny / 4})
    save_file(finite, str(fake_adapter(tmp_path / "good", b"") / "adapter_model.safetensors"))
    assert check_adapter_files(tmp_path / "good")["r"] == 4  # the largest finite value and a subnormal pass
    save_file(
        lora_weights(dtype, b={(7, 3): bad}), str(fake_adapter(tmp_path / "bad", b"") / "adapter_model.safetensors")
    )
    with pytest.raises(RegistryInputError) as e:
        check_adapter_files(tmp_path / "bad")
    assert f"tensor {B!r} holds NaN or infinity. Fix: train or export it again" in str(e.value)
    assert check_adapter_files(tmp_path / "bad", values=False)["r"] == 4  # headers only: the server's catalog check


def test_values_are_read_in_chunks_to_the_last_word(tmp_path, monkeypatch):
    """The check reads each tensor in bounded chunks: a NaN in the very last word of the file, past the first chunk,
    is found; the file's other tensors are checked at their own offsets."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.setattr(adapter_files, "VALUE_CHUNK_BYTES", 16)
    save_file(lora_weights(torch.float32, a={(3, 7): float("nan")}), str(tmp_path / "w.safetensors"))
    path = tmp_path / "w.safetensors"
    header = read_safetensors_header(path)
    assert max(t.span[1] for t in header.values()) == path.stat().st_size
    assert nonfinite_tensor(path, header) == A
    save_file(lora_weights(torch.float32), str(path))
    assert nonfinite_tensor(path, read_safetensors_header(path)) is None


def test_a_rejected_version_keeps_its_lineage_but_cannot_become_servable(tmp_path):
    """A run that diverged fails its gate: registered ``rejected`` (its lineage kept, never served) whatever its
    values. The same bytes registered again as a candidate (the re-evaluation path) are refused, and the version
    stays rejected."""
    import torch
    from safetensors.torch import save_file

    bad = fake_adapter(tmp_path / "bad", b"")
    save_file(lora_weights(torch.bfloat16, a={(0, 0): float("inf")}), str(bad / "adapter_model.safetensors"))
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    rec = reg.register(NewAdapter(name="a", path=bad, base_model="builtin:tiny", status="rejected"))
    assert rec.status == "rejected"
    with pytest.raises(RegistryInputError, match="holds NaN or infinity"):
        reg.register(NewAdapter(name="a", path=bad, base_model="builtin:tiny", metrics={"exact_match": {"gain": 1}}))
    assert [(r.version, r.status) for r in reg.list()] == [(1, "rejected")]
    export_registry(reg, tmp_path / "export")  # and it moves with the registry (import applies the same rule)
    dest = AdapterRegistry(tmp_path / "home" / "registry.duckdb")
    import_registry(dest, tmp_path / "export", tmp_path / "home" / "adapters" / "imported")
    assert [(r.name, r.version, r.status) for r in dest.list()] == [("a", 1, "rejected")]


def test_registry_register_refuses_a_nan_adapter_and_writes_nothing(tmp_path):
    """`lorafoundry registry register` on a peft dir whose lora_B holds a NaN: exit 1, the tensor and the fix, no
    traceback, no version."""
    import torch
    from safetensors.torch import save_file

    from orchestration.cli import app

    home, bad = tmp_path / "home", fake_adapter(tmp_path / "bad", b"", {**CONFIG, "base_model_name_or_path": "base"})
    save_file(lora_weights(torch.bfloat16, b={(2, 2): float("nan")}), str(bad / "adapter_model.safetensors"))
    args = ["registry", "register", str(bad), "--name", "bad", "--base-model", "builtin:tiny", "--home", str(home)]
    res = CliRunner().invoke(app, args)
    flat = " ".join(res.output.split())
    assert res.exit_code == 1 and not isinstance(res.exception, Exception) and "Traceback" not in res.output
    assert f"tensor {B!r} holds NaN or infinity" in flat and "Fix:" in flat, res.output
    assert AdapterRegistry(home / "registry.duckdb").list() == []


# -- the case, through the real entry points ------------------------------------------------------------


def random_weights_adapter(path: Path) -> Path:
    """The issue's dir: a real adapter_config.json and 4 KiB of random bytes as adapter_model.safetensors."""
    return fake_adapter(path, random.Random(0).randbytes(4096), {**CONFIG, "base_model_name_or_path": "base"})


def test_random_bytes_are_refused_by_registry_register_and_nothing_is_written(tmp_path):
    from orchestration.cli import app

    home, bad = tmp_path / "home", random_weights_adapter(tmp_path / "bad")
    args = ["registry", "register", str(bad), "--name", "bad", "--base-model", "builtin:tiny", "--home", str(home)]
    res = CliRunner().invoke(app, args)
    flat = " ".join(res.output.split())
    assert res.exit_code == 1 and not isinstance(res.exception, Exception) and "Traceback" not in res.output
    assert f"{bad / 'adapter_model.safetensors'}: not a safetensors file: header length" in flat, res.output
    assert "Fix:" in flat
    assert AdapterRegistry(home / "registry.duckdb").list() == []
    assert not (home / "adapters" / "imported").exists() or not any((home / "adapters" / "imported").glob("*/*"))


def test_random_bytes_are_refused_by_register_and_the_registry_is_unchanged(tmp_path, random_base):
    """`AdapterRegistry.register`, what the register asset calls."""
    from tests.test_registry import make_adapter_dir

    reg = AdapterRegistry(tmp_path / "r.duckdb")
    reg.register(NewAdapter(name="a", path=make_adapter_dir(tmp_path / "good"), base_model="builtin:tiny"))
    before = reg.list(), reg.query("SELECT * FROM events")
    with pytest.raises(RegistryInputError, match="not a safetensors file"):
        reg.register(NewAdapter(name="a", path=random_weights_adapter(tmp_path / "bad"), base_model=str(random_base)))
    assert (reg.list(), reg.query("SELECT * FROM events")) == before


def nan_weights(path: Path) -> None:
    """Overwrite a real adapter's weights with themselves, one value made NaN: still a well-formed file."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    next(iter(tensors.values())).view(-1)[-1] = float("nan")
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "not a safetensors file"),
        (nan_weights, "holds NaN or infinity"),
    ],
    ids=["random-bytes", "nan-weights"],
)
def test_damaged_weights_in_an_export_are_refused_by_import_and_nothing_is_written(tmp_path, damage, needle):
    """An export whose rows and hashes are consistent but whose weights are not safetensors, or hold a NaN (edited by
    hand, or written by a registry that did not check) is refused whole; the importing registry stays as it was."""
    from orchestration.cli import app
    from tests.test_registry import make_adapter_dir

    src = AdapterRegistry(tmp_path / "src" / "registry.duckdb")
    src.register(NewAdapter(name="good", path=make_adapter_dir(tmp_path / "g"), base_model="builtin:tiny"))
    src.register(NewAdapter(name="bad", path=make_adapter_dir(tmp_path / "b", seed=1), base_model="builtin:tiny"))
    out = tmp_path / "export"
    export_registry(src, out)
    bad_dir = out / "adapters" / "bad" / "v1"
    damage(bad_dir / "adapter_model.safetensors")
    sha, parquet, edited = adapter_sha256(bad_dir)[0], out / "adapters.parquet", tmp_path / "adapters.parquet"
    duckdb.execute(
        f"COPY (SELECT * REPLACE (CASE WHEN name = 'bad' THEN '{sha}' ELSE adapter_sha256 END AS adapter_sha256) "
        f"FROM read_parquet('{parquet}')) TO '{edited}' (FORMAT parquet)"
    )
    os.replace(edited, parquet)  # rows and files agree again: only the check of the files themselves is left

    home = tmp_path / "home"
    dest = AdapterRegistry(home / "registry.duckdb")
    with pytest.raises(RegistryInputError) as e:
        import_registry(dest, out, home / "adapters" / "imported")
    assert "import refused, nothing written: bad@1:" in str(e.value)
    assert f"{bad_dir / 'adapter_model.safetensors'}: " in str(e.value) and needle in str(e.value)
    res = CliRunner().invoke(app, ["registry", "import", str(out), "--home", str(home)])
    flat = " ".join(res.output.split())  # the console wraps at its width, wherever the tmp path's length puts it
    assert res.exit_code == 1 and "Traceback" not in flat and needle in flat, res.output
    assert dest.list() == [] and not any((home / "adapters" / "imported").glob("*/*"))


# -- real peft adapters on the random base ----------------------------------------------------------------------


def peft_adapter(base_dir: Path, out: Path, convert: bool = False, **lora) -> Path:
    """A peft LoRA adapter of the base in ``base_dir``, saved as peft saves it (untrained: the files are the point).
    ``convert``: saved the way the project saves PiSSA/OLoRA (converted against the initial adapter, rank 2r)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    if convert:
        model.save_pretrained(out / "init", safe_serialization=True)
        model.save_pretrained(out, safe_serialization=True, path_initial_model_for_weight_conversion=str(out / "init"))
        shutil.rmtree(out / "init")
    else:
        model.save_pretrained(out, safe_serialization=True)
    return out


VARIANTS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR),
    "rslora": dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "pissa": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa", convert=True),
    "olora": dict(
        r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights="olora", use_rslora=True, convert=True
    ),
    "embedding+modules_to_save": dict(r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
    "lora_bias": dict(r=4, target_modules=["v_proj"], lora_bias=True),
    "rank_pattern": dict(r=4, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2}),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("variant", VARIANTS)
def test_real_peft_adapters_of_every_variant_register_against_their_base(tmp_path, random_base, variant):
    adapter = peft_adapter(random_base, tmp_path / variant, **VARIANTS[variant])
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    rec = reg.register(NewAdapter(name="a", path=adapter, base_model=str(random_base)))
    assert (rec.version, rec.r) == (1, json.loads((adapter / "adapter_config.json").read_text())["r"])


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A Llama of the random base's layout and vocabulary but half its width: same names, other shapes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(0)
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, num_key_value_heads=2, **config)).save_pretrained(out)
    return out


def test_an_adapter_of_another_base_is_refused_naming_the_tensor_and_shapes(tmp_path, random_base, other_base):
    adapter = peft_adapter(random_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    reg = AdapterRegistry(tmp_path / "r.duckdb")
    with pytest.raises(RegistryInputError) as e:
        reg.register(NewAdapter(name="a", path=adapter, base_model=str(other_base)))
    msg = str(e.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape [4, 64], expected [4, 32]" in msg
    assert "from the base model's weight. Fix: register it with --base-model set to the model it was trained on" in msg
    assert reg.list() == []


def test_a_config_whose_rank_is_not_the_weights_is_refused_naming_the_tensor(tmp_path, random_base):
    adapter = peft_adapter(random_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    from orchestration.cli import app

    home = tmp_path / "home"
    args = ["registry", "register", str(adapter), "--name", "a", "--base-model", str(random_base), "--home", str(home)]
    res = CliRunner().invoke(app, args)
    flat = " ".join(res.output.split())
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "lora_A.weight' has shape [4, 64], so rank 4, but adapter_config.json says r = 8" in flat, res.output
    assert AdapterRegistry(home / "registry.duckdb").list() == []
