"""lorafoundry's vLLM plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every one of its processes (API server, engine core, each worker), which is
where fixes to the model runner must be applied: on CPU the workers are spawned, so patching the launching
process alone does nothing. In the API server it also registers the registry-backed LoRA resolver, and in the
worker it puts the integrity check on every adapter load.
"""

from __future__ import annotations


def register() -> None:
    """Apply the CPU multi-LoRA batch-invariance fix and, on CPU, eager logprob ranks; when the server was started
    by lorafoundry (``LORAFOUNDRY_REGISTRY`` set) check every adapter load and register the registry LoRA
    resolver; bound how long and how many connections a client may hold."""
    from serving import cpu_lora_fix

    cpu_lora_fix.apply()
    _eager_logprob_ranks()
    _check_adapter_loads()
    _count_adapter_cache()
    _register_resolver()
    _bound_slow_clients()


def _eager_logprob_ranks() -> None:
    """On CPU, count the tokens ranked above each sampled one eagerly instead of with vLLM's ``torch.compile``d
    ``batched_count_greater_than`` (vllm/v1/sample/ops/logprobs.py). Compiling it stalled a fresh server's first
    request that asks for ``logprobs`` for 13-18 s on a 2-core machine (inductor's compile in the worker, seen in
    the tests' access logs; 3.9 s in a warm process); eager it costs 0.28 ms per step at 8 rows and 3.9 ms at 64
    (compiled: 0.08 / 0.44 ms), and only in steps with a request that asks for logprobs. GPUs keep the compiled
    kernel (there the eager comparison's copy of the logits is what the compile avoids)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.v1.sample.ops.logprobs as ops
    import vllm.v1.sample.sampler as sampler

    def batched_count_greater_than(x, values):
        return (x >= values).sum(-1)

    for module in (ops, sampler):
        if hasattr(module, "batched_count_greater_than"):
            module.batched_count_greater_than = batched_count_greater_than


def _bound_slow_clients() -> None:
    """A request head's time limit and a per-client connection limit on uvicorn's HTTP protocols
    (serving/http_limits.py): the API server's, and harmless in vLLM's other processes."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from serving import http_limits

    http_limits.apply(H11Protocol)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without httptools serves with h11
        return
    http_limits.apply(HttpToolsProtocol)


def _check_adapter_loads() -> None:
    """Wrap vLLM's worker-side adapter loader: every load (at start, on first use, after an eviction from vLLM's
    LoRA cache) reads a private copy of a staged adapter whose bytes hash to the staged dir's name
    (serving.integrity.verified_copy). A staged copy that changed is staged again from the registered files and
    checked again; only when no registered copy has those bytes does the load raise, and the adapter is not
    loaded. What vLLM loaded must be finite too (:func:`serving.integrity.loaded_nonfinite`)."""
    from serving.settings import ServerSettings

    settings = ServerSettings.from_env()
    if settings is None:
        return
    stage_root = settings.stage_root
    import functools
    import shutil
    import tempfile
    from pathlib import Path

    import msgspec
    from vllm.logger import init_logger
    from vllm.lora.worker_manager import WorkerLoRAManager

    from serving.integrity import IntegrityError, loaded_nonfinite, verified_copy

    log = init_logger("vllm.lorafoundry_integrity")  # under "vllm" so it reaches the server log

    original = WorkerLoRAManager._load_adapter
    if getattr(original, "_lorafoundry_checked", False):
        return

    @functools.wraps(original)
    def load_verified(self, lora_request):
        tmp = Path(tempfile.mkdtemp(prefix="lorafoundry-load-"))
        try:
            try:
                copy = verified_copy(lora_request.lora_path, stage_root, tmp / "adapter")
            except (IntegrityError, OSError) as e:
                log.error("lorafoundry: adapter %r: %s; staging it again", lora_request.lora_name, e)
                try:
                    _restage(lora_request.lora_path)
                    copy = verified_copy(lora_request.lora_path, stage_root, tmp / "again")
                except (IntegrityError, OSError) as again:
                    log.error("lorafoundry: refused to load adapter %r: %s", lora_request.lora_name, again)
                    raise IntegrityError(str(again)) from None
            log.info(
                "lorafoundry: loading adapter %r from a verified copy (sha256 %s)",
                lora_request.lora_name,
                Path(lora_request.lora_path).name,
            )
            lora = original(self, msgspec.structs.replace(lora_request, lora_path=str(copy)))
            if problem := loaded_nonfinite(lora):  # the resolver refuses such files; this is what vLLM loaded
                log.error("lorafoundry: refused to load adapter %r: %s", lora_request.lora_name, problem)
                raise IntegrityError(problem)
            return lora
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    load_verified._lorafoundry_checked = True
    WorkerLoRAManager._load_adapter = load_verified


def _count_adapter_cache() -> None:
    """Count, in vLLM's worker, each read of an adapter's weights into its LoRA cache and each eviction (from the
    cache, ``cpu``, or from a batch slot, ``slot``), by comparing the worker's cache and slots before and after
    each ``add_adapter`` (public state only: what vLLM decides stays vLLM's). The counters go to the file that
    `lorafoundry serve` named (``LORAFOUNDRY_WORKER_METRICS``), written at start and after each change; the guard
    serves them (serving/observe.py)."""
    from lora_assets import envs
    from serving.settings import ServerSettings

    path, settings = envs.WORKER_METRICS.get(), ServerSettings.from_env()
    if not path or settings is None:
        return
    import functools

    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from serving.observe import EVICTIONS, WEIGHT_LOADS, write_worker_metrics

    original_add, original_create = LRUCacheWorkerLoRAManager.add_adapter, LRUCacheWorkerLoRAManager.create_lora_manager
    if getattr(original_add, "_lorafoundry_counted", False):
        return
    named: dict[int, tuple[str, str]] = {}  # vLLM's adapter id -> (name, version)

    def held(manager) -> tuple[set[int], set[int]]:
        return set(manager.list_adapters()), {i for i in manager.lora_index_to_id if i is not None}

    @functools.wraps(original_add)
    def add_adapter(self, lora_request):
        cached, slots = held(self._adapter_manager)
        loaded = original_add(self, lora_request)
        name, _, version = lora_request.lora_name.rpartition("@")  # the guard asks for name@VERSION
        if not (name and version.isdigit()):  # loaded at start under its name
            name, version = lora_request.lora_name, str(settings.static_models.get(lora_request.lora_name, ""))
        named[lora_request.lora_int_id] = (name, version)
        cached_after, slots_after = held(self._adapter_manager)
        read = lora_request.lora_int_id not in cached or lora_request.load_inplace  # as vLLM decides to load
        counted = [WEIGHT_LOADS.labels(name, version)] if read else []
        for cache, gone in (("cpu", cached - cached_after), ("slot", slots - slots_after - (cached - cached_after))):
            counted += [EVICTIONS.labels(*named.get(i, ("-", "")), cache) for i in sorted(gone)]
        for counter in counted:
            counter.inc()
        if counted:
            write_worker_metrics(path)
        return loaded

    @functools.wraps(original_create)
    def create_lora_manager(self, *args, **kwargs):
        model = original_create(self, *args, **kwargs)
        write_worker_metrics(path)  # a restarted server's counters start again from zero
        return model

    add_adapter._lorafoundry_counted = True
    LRUCacheWorkerLoRAManager.add_adapter = add_adapter
    LRUCacheWorkerLoRAManager.create_lora_manager = create_lora_manager


def _restage(lora_path: str) -> None:
    """Stage the adapter at ``lora_path`` (``<stage_root>/<sha256>``) again from its registered files (a dir on this
    machine, or the adapter store's objects)."""
    from pathlib import Path

    from serving.integrity import IntegrityError
    from serving.resolver import AdapterResolver

    resolver = AdapterResolver.from_env()
    if resolver is None:
        raise IntegrityError("no registry to stage the adapter again from (LORAFOUNDRY_REGISTRY is not set).")
    resolver.restage(Path(lora_path).name)


def _register_resolver() -> None:
    from serving.resolver import AdapterResolver

    core = AdapterResolver.from_env()
    if core is None:
        return
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class RegistryLoRAResolver(LoRAResolver):
        """Loads `name@VERSION` (what the guard rewrites every adapter reference to) from the verified store."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            import asyncio

            from serving.observe import ADAPTER_LOADS
            from serving.resolver import Refusal

            staged = await asyncio.to_thread(core.resolve_staged, lora_name)
            if isinstance(staged, Refusal):
                return None
            name, _, version = lora_name.rpartition("@")  # the guard asks for every version as name@VERSION
            if name and version.isdigit():
                ADAPTER_LOADS.labels(name, version, "registry").inc()
            # vLLM passes the base's path; /v1/models should show the served base name as the parent
            parent = core.settings.base_name or base_model_name
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(staged), base_model_name=parent)

    LoRAResolverRegistry.register_resolver("lorafoundry", RegistryLoRAResolver())
