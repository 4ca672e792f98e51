"""One base model and its LoRA adapters, with mixed-adapter batched generation (no Ray).

``AdapterPool`` owns the PeftModel: every load gets a unique PEFT adapter name, a batch of requests
for *different* adapters runs as one ``generate(adapter_names=[...])`` forward pass (``__base__`` =
no adapter), and an unload requested while a batch still uses the adapter is deferred until it is
free. ``LoadedAdapter`` is what the Serve deployment's multiplexed loader hands out
(``cm_ray.serve.adapters``).
"""

from __future__ import annotations

import itertools
import json
import threading

from cm_ray.serve.batching import FiniteGuard, MixedBatcher, StopFilter, _Cancelled  # noqa: F401

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" inside a mixed batch


class AdapterPool:
    """A base model plus named LoRA adapters, with mixed-adapter batched generation.

    Thread-safe: generation and (un)loading serialise on one lock, because PEFT's mixed-batch
    forward hooks and ``load_adapter`` both modify the model's modules.
    """

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu",
                 max_time_s: float | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        self.max_time_s = max_time_s
        """Wall-clock bound of one forward batch (transformers' ``max_time``): a request the
        ingress gave up on cannot hold the replica past it."""
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self._in_use: dict[str, int] = {}
        self._doomed: set[str] = set()
        self._grammars: dict[str, object] = {}
        self._compiler = None

    def grammar(self, schema: dict):
        """The compiled xgrammar JSON grammar of ``schema`` (cached; raises on a schema xgrammar
        cannot compile, before any batch runs)."""
        import json

        import xgrammar as xgr

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.model.config.vocab_size,
                    stop_token_ids=[self.tokenizer.eos_token_id])
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    @property
    def loaded(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def load(self, path: str, culture: str) -> str:
        """Load the adapter at ``path``; returns its unique PEFT name (e.g. ``MX-3``).

        PEFT registers an adapter (config + fresh LoRA layers) before it reads the weights, so a
        load that fails is undone here (the adapter deleted, or the wrapper removed when it was
        the first): failed loads never accumulate in the model.
        """
        from peft import PeftConfig, PeftModel
        from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        name = f"{culture}-{next(self._ids)}"
        with self.lock:
            if isinstance(self.model, PeftModel):
                try:
                    self.model.load_adapter(path, adapter_name=name)
                except BaseException:
                    if name in self.loaded:
                        self.model.delete_adapter(name)  # never the last one: others are loaded
                    raise
            else:  # PeftModel.from_pretrained, in two steps so that a failed load can be undone
                config = PeftConfig.from_pretrained(path)
                config.inference_mode = True
                cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
                wrapped = cls(self.model, config, name)
                try:
                    wrapped.load_adapter(path, adapter_name=name)
                except BaseException:
                    self.model = wrapped.unload()  # removes the injected LoRA layers
                    raise
                self.model = wrapped
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

    def _generate(self, enc, names: list[str], schemas=None, guard=None, **kw):
        from transformers import LogitsProcessorList

        from cm_ray.generation.engines import _GrammarMask

        kw["pad_token_id"] = self.tokenizer.pad_token_id
        kw["logits_processor"] = LogitsProcessorList()
        if schemas and schemas[0] is not None:  # guided JSON (a group shares its schema)
            kw["logits_processor"].append(_GrammarMask([self.grammar(x) for x in schemas]))
        if guard is not None:
            kw["logits_processor"].append(guard)
        if self.max_time_s:
            kw["max_time"] = self.max_time_s
        if self.loaded:  # a PeftModel: one forward pass, each row with its own adapter
            return self.model.generate(**enc, adapter_names=names, **kw)
        return self.model.generate(**enc, **kw)

    def generate(self, items: list[dict]) -> list[dict]:
        """Generate for requests that may name different adapters, one forward pass per group of
        equal sampling settings.

        Input keys:  prompt (str, templated), adapter (PEFT name or __base__), max_new_tokens,
                     temperature, top_p, stop (list[str] | None), json_schema (dict | None:
                     guided JSON, xgrammar)
        Output keys: text, finish_reason, prompt_tokens, completion_tokens, batch_size,
                     batch_adapters
        """
        import torch

        out: list[dict | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            schema = json.dumps(it.get("json_schema"), sort_keys=True)
            groups.setdefault((schema, *sorted(self._sampling(it).items())), []).append(i)
        with self.lock, torch.inference_mode():
            self._reap()
            for idx in groups.values():
                group = [items[i] for i in idx]
                enc = self._inputs([g["prompt"] for g in group])
                new = max(g["max_new_tokens"] for g in group)
                guard = FiniteGuard(self.tokenizer.eos_token_id)
                ids = self._generate(enc, [g["adapter"] for g in group],
                                     [g.get("json_schema") for g in group], guard,
                                     max_new_tokens=new, **self._sampling(group[0]))
                n_adapters = len({g["adapter"] for g in group})
                for row, i in enumerate(idx):
                    out[i] = self._decode(ids[row, enc["input_ids"].shape[1]:], items[i],
                                          int(enc["attention_mask"][row].sum()))
                    out[i].update(batch_size=len(group), batch_adapters=n_adapters,
                                  non_finite=row in guard.bad)
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

    def stream(self, item: dict, streamer, cancel: threading.Event | None = None) -> dict:
        """Generate one request into a transformers streamer (runs in a thread); returns what
        ``generate`` returns for it, minus the text already streamed. Setting ``cancel`` (the
        client went away) stops it after the current token."""
        import torch

        from transformers import StoppingCriteriaList

        with self.lock, torch.inference_mode():
            enc = self._inputs([item["prompt"]])
            guard = FiniteGuard(self.tokenizer.eos_token_id)
            try:
                ids = self._generate(enc, [item["adapter"]], [item.get("json_schema")], guard,
                                     max_new_tokens=item["max_new_tokens"], streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                                     **self._sampling(item))
            except Exception:
                streamer.end()  # unblock the reader; the error surfaces in the summary
                raise
        out = self._decode(ids[0, enc["input_ids"].shape[1]:], item, enc["input_ids"].shape[1])
        return {**out, "non_finite": bool(guard.bad)}


class LoadedAdapter:
    """What the multiplexed loader returns. Serve calls ``__del__`` on LRU eviction and Python may
    call it again at garbage collection: the second call is a no-op."""

    def __init__(self, pool: AdapterPool, culture: str, name: str, load_ms: float,
                 version: str | None = None):
        self.pool, self.culture, self.name, self.load_ms = pool, culture, name, load_ms
        self.version = version  # the published content hash (None: a dir written in place)
        self.uses = 0
        self._unloaded = False

    def __del__(self):
        if not self._unloaded:
            self._unloaded = True
            self.pool.unload(self.name)
