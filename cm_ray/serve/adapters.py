"""The adapter-server Serve deployment: one base model per replica, culture LoRA adapters loaded
on demand, mixed-adapter batches (the model and its adapters live in ``cm_ray.serve.pool``).

* ``@serve.multiplexed`` keeps up to ``serve.max_adapters_per_replica`` adapters per replica (LRU)
  and makes Serve route each request to a replica that already holds its adapter;
* ``MixedBatcher`` (plain asyncio, public APIs only) collects whatever requests arrive, for any
  adapter this replica holds, into one forward pass (``@serve.batch`` would split batches by
  multiplexed model id). This is the CPU fallback: static batches (a batch runs to its longest
  request) and a stream holds the model for its whole response; ``serve.engine: vllm`` batches
  continuously.

Adapters are read at their current published version (``artifacts.published_adapter``; the
version id is the content hash, kept on ``LoadedAdapter.version``). A version that is malformed
or fails to load answers 422 naming the adapter, is not retried until a new version is
published, and is not advertised by ``adapter_ids`` (``/v1/models``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time

from ray import serve

from cm_ray import artifacts
from cm_ray.artifacts import JOINT
from cm_ray.serve.adapter_check import WEIGHTS, config_problem, weights_problem
from cm_ray.serve.api import ApiError, check_adapter_id
from cm_ray.serve.pool import BASE_ADAPTER, AdapterPool, LoadedAdapter, MixedBatcher, StopFilter
from cm_ray.serve.responses import fingerprint, tag_items


_VALID: dict[tuple[str, str, str], str | None] = {}
"""(root, adapter, version) -> why that published version is unusable (None: it is fine).
Versions are content-addressed, so a verdict never goes stale."""
_BROKEN: dict[tuple[str, str], tuple[str, str]] = {}
"""(root, adapter) -> (version key, error) of a version that failed to load in this process."""


def adapter_problem(store, parts: tuple[str, ...]) -> str | None:
    """Why the PEFT adapter dir at ``parts`` cannot load (missing file, config that is not a
    PEFT config, a safetensors file whose header or length is wrong), or None. Reads only the
    config and the safetensors header."""
    sizes = store.file_sizes(*parts)
    for f in ("adapter_config.json", WEIGHTS):
        if f not in sizes:
            return f"{f} is missing"
    try:
        config = json.loads(store.read_bytes(*parts, "adapter_config.json"))
    except ValueError:
        return "adapter_config.json is not JSON"
    if problem := config_problem(config):
        return problem
    size = sizes[WEIGHTS]
    try:
        with store.fs.open_input_file(store.fs_path(*parts, WEIGHTS)) as f:
            n = int.from_bytes(f.read_at(8, 0), "little") if size >= 8 else -1
            header = json.loads(f.read_at(n, 8)) if 0 < n <= size - 8 else None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OSError):
        ends = None
    if not ends or 8 + n + max(ends) != size:
        return f"{WEIGHTS} is not a complete safetensors file"
    return None


def _problem(store, name: str, parts: tuple[str, ...], version: str | None) -> str | None:
    """``adapter_problem`` of a published version (cached per version id, and checked against
    the file sizes its pointer recorded); dirs written in place are not checked here."""
    if version is None:
        return None
    key = (store.root, name, version)
    if key not in _VALID:
        ptr = store.read_pointer(*artifacts.adapter_dir(name)) or {}
        problem = adapter_problem(store, parts)
        if problem is None and ptr.get("version") == version and \
                store.file_sizes(*parts) != ptr.get("files"):
            problem = "its files differ from what was published"
        _VALID[key] = problem
    return _VALID[key]


def _version_key(store, parts: tuple[str, ...], version: str | None) -> str:
    """The version id, or for a dir written in place a fingerprint of its file sizes."""
    return version or "in-place:" + artifacts.stable_id(sorted(store.file_sizes(*parts).items()))


def _known_broken(store, name: str, parts: tuple[str, ...], version: str | None) -> str | None:
    """The load error of this very version when it already failed here, else None."""
    hit = _BROKEN.get((store.root, name))
    return hit[1] if hit and hit[0] == _version_key(store, parts, version) else None


def adapter_listing(store) -> dict[str, tuple[str | None, bool]]:
    """Every adapter id (culture keys, ``_joint``) with a published version: id -> (its current
    version, whether it is usable). Usable: complete and well-formed (or an adapter_config.json
    written in place), and not known to fail loading in this process. A pinned request for an
    unusable one gets the servers' 422 naming it. One listing and one pointer read per adapter."""
    from cm_ray.cultures import is_culture_key

    out = {}
    for d in store.listdir(*artifacts.adapters_dir()):
        got = (is_culture_key(d) or d == JOINT) and artifacts.published_adapter(store, d)
        if got:
            ok = _problem(store, d, *got) is None and not _known_broken(store, d, *got)
            out[d] = (got[1], ok)
    return out


def adapter_versions(store) -> dict[str, str | None]:
    """The usable adapters of ``adapter_listing`` (what ``/v1/models`` advertises) and their
    current version (content hash; None for a dir written in place)."""
    return {k: v for k, (v, ok) in adapter_listing(store).items() if ok}


def adapter_ids(store) -> list[str]:
    """The ids of ``adapter_versions``."""
    return list(adapter_versions(store))


@serve.deployment
class AdapterServer:
    """Serve deployment: the base model and this replica's LRU set of culture adapters."""

    def __init__(self, serve_cfg, models, root: str):
        """``serve_cfg``: the serve section; ``models``: the model refs (base, cache_dir); ``root``:
        the artifact root holding ``adapters/``."""
        from cm_ray.models import default_dtype, resolve_model
        from cm_ray.storage import ArtifactStore

        self.serve_cfg = s = serve_cfg
        self.store = ArtifactStore(root)
        base = models.base or models.generator
        import torch
        import transformers

        self.fingerprint = fingerprint("transformers", transformers.__version__)  # in every answer

        # Decided in the replica, where the model runs: its GPU (serve.num_gpus) when CUDA is here.
        device = "cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model_dir = resolve_model(base, models.cache_dir)
        self.pool = AdapterPool(self.model_dir, default_dtype(device), device,
                                max_time_s=s.generation_timeout_s)
        self.faulted: dict[str, str] = {}  # PEFT name -> why (non-finite output): 422 from now on
        self.batcher = MixedBatcher(self.pool.generate, s.max_batch_size, s.batch_wait_timeout_s)
        # max_num_models_per_replica is fixed at decoration: wrap per instance to take the config.
        # (Serve keeps its LRU cache on the decorated object, so decorate a plain function.)
        async def load(culture: str) -> LoadedAdapter:
            return await self._load_adapter(culture)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=s.max_adapters_per_replica)(
            load)

    async def _load_adapter(self, model_id: str) -> LoadedAdapter:
        """Load the current published version of ``<culture>[@version]``. A version that fails
        is cached as broken (422 at once, no new load) until another version is published."""
        culture = check_adapter_id(model_id.partition("@")[0])
        got = await asyncio.to_thread(artifacts.published_adapter, self.store, culture)
        if got is None:
            raise ApiError(404, f"model: no adapter {culture!r} under "
                                f"{self.store.uri(*artifacts.adapters_dir())}",
                           "model", "not_found_error")
        parts, version = got
        known = await asyncio.to_thread(_known_broken, self.store, culture, parts, version)
        if known:
            raise ApiError(422, known, "model", "invalid_adapter_error")
        t0 = time.perf_counter()
        tmp, fetched = None, False
        try:
            if problem := await asyncio.to_thread(_problem, self.store, culture, parts, version):
                fetched = True
                raise ValueError(problem)
            local = self.store.local_path(*parts)
            if local is None:  # S3: copy the small adapter dir locally, load, then drop the copy
                tmp = tempfile.mkdtemp(prefix=f"adapter-{culture}-")
                local = await asyncio.to_thread(self.store.download_dir, tmp, *parts)
            fetched = True
            if problem := await asyncio.to_thread(weights_problem, str(local), self.model_dir):
                raise ValueError(problem)
            name = await asyncio.to_thread(self.pool.load, str(local), culture)
        except Exception as e:
            msg = (f"model: adapter {culture!r} (version {version or 'in place'}) on the store "
                   f"could not be loaded: {type(e).__name__}: {str(e)[:300]}")
            if fetched:  # the adapter itself is bad (not a store hiccup): do not retry this version
                key = await asyncio.to_thread(_version_key, self.store, parts, version)
                _BROKEN[(self.store.root, culture)] = (key, msg)
            raise ApiError(422, msg, "model", "invalid_adapter_error") from None
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        _BROKEN.pop((self.store.root, culture), None)
        return LoadedAdapter(self.pool, culture, name, (time.perf_counter() - t0) * 1000, version)

    async def _resolve(self, req: dict) -> tuple[dict, LoadedAdapter | None]:
        """The generation item for a request; loads the request's adapter (multiplexed id). Nothing
        is awaited between the load and the caller's ``acquire``: an eviction cannot delete the
        adapter before its request holds it (guided requests compile their grammar first)."""
        s = self.serve_cfg
        if req.get("json_schema") is not None:
            try:
                await asyncio.to_thread(self.pool.grammar, req["json_schema"])
            except Exception as e:  # a schema the grammar compiler refuses: this request only
                raise ApiError(400, f"response_format: the JSON schema cannot be enforced: "
                                    f"{str(e)[:300]}", "response_format") from None
        model_id = serve.get_multiplexed_model_id()
        adapter = await self.get_adapter(model_id) if model_id else None
        if adapter and adapter.name in self.faulted:
            raise ApiError(422, self.faulted[adapter.name], "model", "invalid_adapter_error")
        item = {"prompt": self.pool.prompt_text(req["payload"]), "json_schema": req.get("json_schema"),
                "adapter": adapter.name if adapter else BASE_ADAPTER,
                "max_new_tokens": min(req.get("max_new_tokens") or s.max_new_tokens,
                                      s.max_new_tokens),
                "temperature": req.get("temperature", 0.0), "top_p": req.get("top_p", 1.0),
                "stop": req.get("stop")}
        return item, adapter

    def _fault(self, adapter: LoadedAdapter) -> dict:
        """``adapter`` produced non-finite values: its version is broken (422, not listed, not
        loaded again until republished); its batch neighbours were served."""
        msg = (f"model: adapter {adapter.culture!r} (version {adapter.version or 'in place'}) "
               "produced non-finite values (NaN or infinity) and is not served")
        self.faulted[adapter.name] = msg
        _BROKEN[(self.store.root, adapter.culture)] = (adapter.version or "", msg)
        return {"error": ApiError(422, msg, "model", "invalid_adapter_error").relay()}

    async def generate(self, req: dict) -> dict:
        """One request -> {text, finish_reason, usage counts, batch info} or {error: ...}."""
        try:
            item, adapter = await self._resolve(req)
        except ApiError as e:
            return {"error": e.relay()}
        info = {"adapter_cold": bool(adapter and adapter.uses == 0),
                "adapter_load_ms": round(adapter.load_ms, 1) if adapter else 0.0}
        if adapter:
            adapter.uses += 1
            self.pool.acquire(adapter.name)  # no await since loading: eviction cannot interleave
        try:
            result = await self.batcher.submit(item)
        except Exception as e:  # this request failed on its own (the batcher isolates it)
            return {"error": ApiError(500, f"generation failed: {type(e).__name__}", None,
                                      "server_error").relay()}
        finally:
            if adapter:
                self.pool.release(adapter.name)
        if result.get("non_finite") and adapter:
            return self._fault(adapter)
        return {**result, **info, "system_fingerprint": self.fingerprint}

    async def generate_stream(self, req: dict):
        """Streamed variant: yields {delta: str} items, then {finish_reason, usage} or {error}."""
        async for item in tag_items(self._stream(req), self.fingerprint):
            yield item

    async def _stream(self, req: dict):
        from transformers import TextIteratorStreamer

        try:
            item, adapter = await self._resolve(req)
        except ApiError as e:
            yield {"error": e.relay()}
            return
        streamer = TextIteratorStreamer(self.pool.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True, timeout=600)
        cold = bool(adapter and adapter.uses == 0)
        if adapter:
            adapter.uses += 1
            self.pool.acquire(adapter.name)
        done: dict = {}
        cancel = threading.Event()  # set when the client goes away: generation stops

        def run():
            try:
                done.update(self.pool.stream(item, streamer, cancel))
            except Exception as e:  # reported to the client as the stream's last event
                done["error"] = ApiError(500, f"generation failed: {type(e).__name__}", None,
                                         "server_error").relay()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        stops = StopFilter(item["stop"])  # stop strings apply to the stream as to the answer
        try:
            while (piece := await asyncio.to_thread(next, streamer, None)) is not None:
                if piece := stops.push(piece):
                    yield {"delta": piece}
            if rest := stops.flush():
                yield {"delta": rest}
        finally:
            cancel.set()  # a no-op when it finished; else the consumer is gone (cancelled)
            await asyncio.to_thread(worker.join)
            if adapter:
                self.pool.release(adapter.name)
        if done.get("non_finite") and adapter:
            yield self._fault(adapter)
            return
        yield {**done, "adapter_cold": cold}

    def loaded_adapters(self) -> list[str]:
        """Cultures whose adapters this replica holds (PEFT names are ``<culture>-<n>``)."""
        return sorted(name.rsplit("-", 1)[0] for name in self.pool.loaded)
