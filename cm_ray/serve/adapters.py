"""One base model per replica, culture LoRA adapters loaded on demand, mixed-adapter batches.

``AdapterPool`` (no Ray) owns the PeftModel: every load gets a unique PEFT adapter name, a batch
of requests for *different* adapters runs as one ``generate(adapter_names=[...])`` forward pass
(``__base__`` = no adapter), and an unload requested while a batch still uses the adapter is
deferred until it is free. ``AdapterServer`` is the Serve deployment around it:

* ``@serve.multiplexed`` keeps up to ``serve.max_adapters_per_replica`` adapters per replica (LRU)
  and makes Serve route each request to a replica that already holds its adapter;
* ``@serve.batch`` collects whatever requests arrive, for any adapter this replica holds, into
  one forward pass. Serve splits batches by multiplexed model id, so requests enter the batch
  queue with the id cleared from their context (the adapter name travels in the request).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
import shutil
import tempfile
import threading
import time

from ray import serve

from cm_ray.serve.api import JOINT, ApiError, check_adapter_id

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" inside a mixed batch


def adapter_ids(store) -> list[str]:
    """Adapter ids (culture keys, ``_joint``) that have an adapter_config.json on the store."""
    from cm_ray.cultures import is_culture_key

    return [d for d in store.listdir("adapters") if (is_culture_key(d) or d == JOINT)
            and store.exists("adapters", d, "adapter_config.json")]


class AdapterPool:
    """A base model plus named LoRA adapters, with mixed-adapter batched generation.

    Thread-safe: generation and (un)loading serialise on one lock, because PEFT's mixed-batch
    forward hooks and ``load_adapter`` both modify the model's modules.
    """

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self._in_use: dict[str, int] = {}
        self._doomed: set[str] = set()

    @property
    def loaded(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def load(self, path: str, culture: str) -> str:
        """Load the adapter at ``path``; returns its unique PEFT name (e.g. ``MX-3``)."""
        from peft import PeftModel

        name = f"{culture}-{next(self._ids)}"
        with self.lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self._reap()
        return name

    def unload(self, name: str) -> None:
        """Ask for ``name`` to be deleted; idempotent, never blocks (deletion happens in _reap)."""
        if name in self.loaded:
            self._doomed.add(name)
        if self.lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self.lock.release()

    def _reap(self) -> None:
        # Caller holds the lock. PEFT breaks when its last adapter is deleted (stale active
        # adapter), so the last one stays until another one is loaded.
        for name in sorted(self._doomed):
            if name not in self.loaded:
                self._doomed.discard(name)
            elif self._in_use.get(name, 0) == 0 and len(self.loaded) > 1:
                self.model.delete_adapter(name)
                self._doomed.discard(name)

    def acquire(self, name: str) -> None:
        self._in_use[name] = self._in_use.get(name, 0) + 1

    def release(self, name: str) -> None:
        self._in_use[name] -= 1

    def prompt_text(self, payload: dict) -> str:
        if "messages" in payload:
            return self.tokenizer.apply_chat_template(payload["messages"], tokenize=False,
                                                      add_generation_prompt=True)
        return payload["prompt"]

    def _inputs(self, texts: list[str]):
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.to(self.device)

    def _sampling(self, item: dict) -> dict:
        if item.get("temperature", 0.0) > 0:
            return {"do_sample": True, "temperature": item["temperature"], "top_p": item["top_p"]}
        return {"do_sample": False}

    def _generate(self, enc, names: list[str], **kw):
        kw["pad_token_id"] = self.tokenizer.pad_token_id
        if self.loaded:  # a PeftModel: one forward pass, each row with its own adapter
            return self.model.generate(**enc, adapter_names=names, **kw)
        return self.model.generate(**enc, **kw)

    def generate(self, items: list[dict]) -> list[dict]:
        """Generate for requests that may name different adapters, one forward pass per group of
        equal sampling settings.

        Input keys:  prompt (str, templated), adapter (PEFT name or __base__), max_new_tokens,
                     temperature, top_p, stop (list[str] | None)
        Output keys: text, finish_reason, prompt_tokens, completion_tokens, batch_size,
                     batch_adapters
        """
        import torch

        out: list[dict | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(tuple(sorted(self._sampling(it).items())), []).append(i)
        with self.lock, torch.inference_mode():
            self._reap()
            for idx in groups.values():
                group = [items[i] for i in idx]
                enc = self._inputs([g["prompt"] for g in group])
                new = max(g["max_new_tokens"] for g in group)
                ids = self._generate(enc, [g["adapter"] for g in group], max_new_tokens=new,
                                     **self._sampling(group[0]))
                n_adapters = len({g["adapter"] for g in group})
                for row, i in enumerate(idx):
                    out[i] = self._decode(ids[row, enc["input_ids"].shape[1]:], items[i],
                                          int(enc["attention_mask"][row].sum()))
                    out[i].update(batch_size=len(group), batch_adapters=n_adapters)
        return out  # type: ignore[return-value]

    def _decode(self, tokens, item: dict, prompt_tokens: int) -> dict:
        tokens = tokens.tolist()[: item["max_new_tokens"]]
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in tokens:
            tokens, finish = tokens[: tokens.index(eos)], "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in item.get("stop") or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return {"text": text, "finish_reason": finish, "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens)}

    def stream(self, item: dict, streamer) -> dict:
        """Generate one request into a transformers streamer (runs in a thread); returns what
        ``generate`` returns for it, minus the text already streamed."""
        import torch

        with self.lock, torch.inference_mode():
            enc = self._inputs([item["prompt"]])
            try:
                ids = self._generate(enc, [item["adapter"]], max_new_tokens=item["max_new_tokens"],
                                     streamer=streamer, **self._sampling(item))
            except Exception:
                streamer.end()  # unblock the reader; the error surfaces in the summary
                raise
        return self._decode(ids[0, enc["input_ids"].shape[1]:], item, enc["input_ids"].shape[1])


class LoadedAdapter:
    """What the multiplexed loader returns. Serve calls ``__del__`` on LRU eviction and Python may
    call it again at garbage collection: the second call is a no-op."""

    def __init__(self, pool: AdapterPool, culture: str, name: str, load_ms: float):
        self.pool, self.culture, self.name, self.load_ms = pool, culture, name, load_ms
        self.uses = 0
        self._unloaded = False

    def __del__(self):
        if not self._unloaded:
            self._unloaded = True
            self.pool.unload(self.name)


def _without_model_id() -> contextvars.Context:
    """A copy of the current context whose Serve request carries no multiplexed model id, so
    that ``@serve.batch`` (which splits batches by that id) mixes adapters in one batch."""
    from ray.serve import context as sctx

    ctx = contextvars.copy_context()
    ctx.run(lambda: sctx._serve_request_context.set(
        dataclasses.replace(sctx._get_serve_request_context(), multiplexed_model_id="")))
    return ctx


@serve.deployment
class AdapterServer:
    """Serve deployment: the base model and this replica's LRU set of culture adapters."""

    def __init__(self, cfg_dict: dict):
        from cm_ray.config import config_from_dict
        from cm_ray.models import default_dtype, resolve_model
        from cm_ray.storage import ArtifactStore

        self.cfg = config_from_dict(cfg_dict)
        self.store = ArtifactStore(self.cfg.root)
        base = self.cfg.models.base or self.cfg.models.generator
        s = self.cfg.serve
        device = "cuda" if s.num_gpus > 0 else "cpu"
        self.pool = AdapterPool(resolve_model(base, self.cfg.models.cache_dir),
                                default_dtype(device), device)
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        # max_num_models_per_replica is fixed at decoration: wrap per instance to take the config.
        # (Serve keeps its LRU cache on the decorated object, so decorate a plain function.)
        async def load(culture: str) -> LoadedAdapter:
            return await self._load_adapter(culture)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=s.max_adapters_per_replica)(
            load)

    async def _load_adapter(self, culture: str) -> LoadedAdapter:
        culture = check_adapter_id(culture)
        if not self.store.exists("adapters", culture, "adapter_config.json"):
            raise ApiError(404, f"model: no adapter {culture!r} under {self.store.uri('adapters')}",
                           "model", "not_found_error")
        t0 = time.perf_counter()
        local = self.store.local_path("adapters", culture)
        tmp = None
        try:
            if local is None:  # S3: copy the small adapter dir locally, load, then drop the copy
                tmp = tempfile.mkdtemp(prefix=f"adapter-{culture}-")
                local = await asyncio.to_thread(self.store.download_dir, tmp, "adapters", culture)
            name = await asyncio.to_thread(self.pool.load, str(local), culture)
        except Exception as e:
            raise ApiError(422, f"model: adapter {culture!r} on the store could not be loaded: "
                                f"{type(e).__name__}: {str(e)[:300]}", "model",
                           "invalid_adapter_error") from None
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        return LoadedAdapter(self.pool, culture, name, (time.perf_counter() - t0) * 1000)

    async def _resolve(self, req: dict) -> tuple[dict, LoadedAdapter | None]:
        """The generation item for a request; loads the request's adapter (multiplexed id)."""
        model_id = serve.get_multiplexed_model_id()
        adapter = await self.get_adapter(model_id) if model_id else None
        s = self.cfg.serve
        item = {"prompt": self.pool.prompt_text(req["payload"]),
                "adapter": adapter.name if adapter else BASE_ADAPTER,
                "max_new_tokens": min(req.get("max_new_tokens") or s.max_new_tokens,
                                      s.max_new_tokens),
                "temperature": req.get("temperature", 0.0), "top_p": req.get("top_p", 1.0),
                "stop": req.get("stop")}
        return item, adapter

    async def generate(self, req: dict) -> dict:
        """One request -> {text, finish_reason, usage counts, batch info} or {error: ...}."""
        try:
            item, adapter = await self._resolve(req)
        except ApiError as e:
            return {"error": e.body()}
        info = {"adapter_cold": bool(adapter and adapter.uses == 0),
                "adapter_load_ms": round(adapter.load_ms, 1) if adapter else 0.0}
        if adapter:
            adapter.uses += 1
            self.pool.acquire(adapter.name)  # no await since loading: eviction cannot interleave
        try:
            result = await asyncio.create_task(self._batched(item), context=_without_model_id())
        finally:
            if adapter:
                self.pool.release(adapter.name)
        return {**result, **info}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[dict]) -> list[dict]:
        # Off the event loop, so the replica keeps accepting (and batching) requests meanwhile.
        return await asyncio.to_thread(self.pool.generate, items)

    async def generate_stream(self, req: dict):
        """Streamed variant: yields {delta: str} items, then {finish_reason, usage} or {error}."""
        from transformers import TextIteratorStreamer

        try:
            item, adapter = await self._resolve(req)
        except ApiError as e:
            yield {"error": e.body()}
            return
        streamer = TextIteratorStreamer(self.pool.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True, timeout=600)
        cold = bool(adapter and adapter.uses == 0)
        if adapter:
            adapter.uses += 1
            self.pool.acquire(adapter.name)
        done: dict = {}

        def run():
            try:
                done.update(self.pool.stream(item, streamer))
            except Exception as e:  # reported to the client as the stream's last event
                done["error"] = ApiError(500, f"generation failed: {e}", None, "server_error").body()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while (piece := await asyncio.to_thread(next, streamer, None)) is not None:
                if piece:
                    yield {"delta": piece}
        finally:
            await asyncio.to_thread(worker.join)
            if adapter:
                self.pool.release(adapter.name)
        yield {**done, "adapter_cold": cold}

    def loaded_adapters(self) -> list[str]:
        return self.pool.loaded
