"""Run configuration: dataclasses with attribute docstrings, one YAML per run, dotted overrides.

``load_config("configs/demo.yaml", ["train.lora_r=16"])`` reads the YAML, applies the overrides,
builds the nested dataclasses and validates them. Every error names the offending field by its
dotted path (``train.lora_r: must be positive, got 0``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster address; None starts (or joins, under `ray job submit`) a local cluster."""
    num_cpus: int | None = None
    """Logical CPUs for a local cluster. More than the physical cores avoids Data/Train deadlocks."""
    include_dashboard: bool = True
    """Train V2 logs controller errors every second without the dashboard."""


@dataclass
class ModelsConfig:
    generator: str = "embedded:smollm2-135m-instruct"
    """Generator LLM: `embedded:<name>`, a local dir, an `s3://` URI or a hub id."""
    encoder: str = "embedded:all-minilm-l6-v2"
    """Sentence encoder for the router and embedding filters."""
    base: str | None = None
    """Base model for adapters; None = the generator."""
    cache_dir: str | None = None
    """Where converted / downloaded models are cached; None = $CM_RAY_CACHE or ~/.cache/cm_ray."""


@dataclass
class QueryConfig:
    n_specific: int = 3
    """Task-specific queries per (culture, task)."""
    n_agnostic: int = 3
    """Task-agnostic queries per (culture, task)."""
    kinds: list[str] = field(default_factory=lambda: ["specific", "agnostic"])
    """Which query kinds to generate (ablation: one of them only)."""
    near_dup_threshold: float = 0.8
    """Jaccard similarity of word shingles at or above which two queries count as duplicates."""
    near_dup_shingle: int = 1
    """Words per shingle for query near-duplicates (1 = word sets: queries are a few words long)."""
    max_new_tokens: int = 160
    temperature: float = 0.7
    min_chars: int = 8
    """Shorter generated queries are rejected (counted as too_short)."""
    max_chars: int = 200
    """Longer generated queries are rejected (counted as too_long)."""
    template_fill: bool = True
    """Top each (culture, task, kind) up to its count with deterministic template queries built
    from the task spec and culture (source "template"), after the LLM's queries."""

    def __post_init__(self):
        for k in self.kinds:
            _check(k in ("specific", "agnostic"), "queries.kinds",
                   f"must list specific and/or agnostic, got {k!r}")
        _check(bool(self.kinds), "queries.kinds", "must list at least one kind")
        _check(self.n_specific >= 0 and self.n_agnostic >= 0, "queries.n_specific",
               "query counts must be >= 0")
        _check(0 < self.near_dup_threshold <= 1, "queries.near_dup_threshold",
               f"must be in (0, 1], got {self.near_dup_threshold}")
        _check(0 < self.min_chars <= self.max_chars, "queries.min_chars",
               f"must be positive and <= max_chars, got {self.min_chars}")


@dataclass
class SearchConfig:
    provider: str = "bm25"
    """bm25 (offline corpus), searxng, brave, serper, tavily or you."""
    fallback: list[str] = field(default_factory=list)
    """Providers tried in order when the primary fails a query."""
    endpoint: str | None = None
    """Override the provider's API URL (self-hosted SearXNG, loopback tests)."""
    endpoints: dict = field(default_factory=dict)
    """Per-provider URL overrides, e.g. {searxng: http://host/search}; beats `endpoint`."""
    corpus: str | None = None
    """JSONL/Parquet passages for bm25; None = the corpus shipped with cm_ray."""
    top_k: int = 5
    qps: float | None = 5.0
    """Requests per second per provider across all actors; None = unthrottled."""
    max_in_flight: int = 8
    """Concurrent requests per actor."""
    concurrency: int = 2
    """Actors in the map_batches pool."""
    batch_size: int = 16
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 15.0
    fetch_pages: bool = False
    """Fetch the top URLs and extract their main text."""
    fetch_top_k: int = 2
    fetch_max_bytes: int = 2_000_000
    allow_private_urls: bool = False
    """Allow page fetches to private/loopback/link-local addresses (tests only)."""
    fetch_timeout_s: float = 10.0
    """Wall-clock limit for one page fetch (all redirects included)."""
    cache: bool = True
    """Reuse cached provider answers (search/cache/ under the root); false = always ask."""
    cache_flush_rows: int = 256
    """Cache entries written per shard while a culture is still running (resume granularity)."""
    actor_cpus: float = 0.25
    """CPUs reserved per searcher actor (I/O bound)."""

    def __post_init__(self):
        from cm_ray.data.providers import PROVIDERS

        for where, name in [("search.provider", self.provider),
                            *((f"search.fallback[{i}]", n) for i, n in enumerate(self.fallback)),
                            *((f"search.endpoints.{n}", n) for n in self.endpoints)]:
            _check(name in PROVIDERS, where,
                   f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
        _check(self.provider not in self.fallback, "search.fallback",
               f"must not repeat the primary provider {self.provider!r}")
        _check(self.qps is None or self.qps > 0, "search.qps", f"must be > 0 or null, got {self.qps}")
        for name in ("top_k", "max_in_flight", "concurrency", "batch_size", "fetch_top_k",
                     "fetch_max_bytes", "cache_flush_rows"):
            _check(getattr(self, name) > 0, f"search.{name}",
                   f"must be positive, got {getattr(self, name)}")
        _check(self.max_retries >= 0, "search.max_retries", f"must be >= 0, got {self.max_retries}")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_s", "fetch_timeout_s", "actor_cpus"):
            _check(getattr(self, name) > 0, f"search.{name}",
                   f"must be positive, got {getattr(self, name)}")


@dataclass
class SynthesisConfig:
    engine: str = "transformers"
    """transformers, vllm (ray.data.llm) or openai (any OpenAI-compatible HTTP endpoint)."""
    samples_per_prompt: int = 3
    prompts_per_pair: int = 2
    """Synthesis prompts per (culture, task); each draws a different slice of the snippets."""
    snippets_per_prompt: int = 4
    max_new_tokens: int = 384
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 8
    concurrency: int = 1
    """Engine replicas."""
    threads_per_replica: int | None = None
    """torch threads of a transformers replica; None = CPU cores // concurrency."""
    dtype: str = "auto"
    """auto = float32 on CPU, bfloat16 on GPU."""
    guided_json: bool = True
    """Structured decoding where the engine supports it."""
    guided_max_string_chars: int | None = 300
    """Under guided decoding, cap free JSON strings at this many characters (None = no cap)."""
    guided_max_items: int | None = 10
    """Under guided decoding, cap JSON arrays at this many items (None = no cap)."""
    vllm_max_model_len: int = 2048
    vllm_max_num_seqs: int = 16
    """Concurrent sequences per vLLM engine (KV cache is sized for this on CPU)."""
    vllm_enforce_eager: bool | None = None
    """None = eager on CPU (no compile warm-up), CUDA graphs on GPU."""
    vllm_engine_kwargs: dict = field(default_factory=dict)
    """Extra vLLM engine arguments, merged last (e.g. {gpu_memory_utilization: 0.8})."""
    openai_base_url: str | None = None
    """OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1; None = https://api.openai.com/v1."""
    openai_model: str | None = None
    """Model name sent to the endpoint; None = models.generator."""
    openai_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never logged); unset = no Authorization header."""
    openai_qps: float | None = None
    """Requests per second across all engine replicas; None = unthrottled."""
    openai_max_in_flight: int = 8
    """Concurrent requests per replica."""
    openai_max_retries: int = 4
    """Retries on 429/5xx/network errors (Retry-After honoured, else exponential backoff)."""
    openai_backoff_base_s: float = 0.5
    openai_backoff_max_s: float = 30.0
    openai_timeout_s: float = 120.0
    openai_price_in_per_1m: float = 0.0
    """USD per 1M prompt tokens, for the cost counter."""
    openai_price_out_per_1m: float = 0.0
    """USD per 1M completion tokens, for the cost counter."""
    relevance_filter: str = "embedding"
    """embedding, judge or none."""
    relevance_threshold: float = 0.15
    near_dup_threshold: float = 0.85
    """Word 3-gram Jaccard (MinHash above a few hundred rows) at which two samples' inputs are
    near duplicates; copies of the task's seed examples are dropped the same way."""
    validation_fraction: float = 0.2
    balance_labels: bool = True
    """Cap the majority label (classification and multiple-choice tasks)."""
    label_balance_ratio: float = 1.5
    """A label keeps at most ceil(ratio x the second most frequent label's count) rows."""
    require_sources: bool = True
    """A sample must cite at least one of its prompt's snippet ids (grounding)."""

    def _check_filters(self):
        _check(self.relevance_filter in ("embedding", "judge", "none"), "synthesis.relevance_filter",
               f"must be embedding, judge or none, got {self.relevance_filter!r}")
        _check(0 <= self.validation_fraction < 1, "synthesis.validation_fraction",
               f"must be in [0, 1), got {self.validation_fraction}")
        _check(0 < self.near_dup_threshold <= 1, "synthesis.near_dup_threshold",
               f"must be in (0, 1], got {self.near_dup_threshold}")
        _check(self.label_balance_ratio >= 1, "synthesis.label_balance_ratio",
               f"must be >= 1, got {self.label_balance_ratio}")
        for name in ("samples_per_prompt", "prompts_per_pair", "snippets_per_prompt"):
            _check(getattr(self, name) > 0, f"synthesis.{name}",
                   f"must be positive, got {getattr(self, name)}")

    def __post_init__(self):
        _check(self.engine in ("transformers", "vllm", "openai"), "synthesis.engine",
               f"must be transformers, vllm or openai, got {self.engine!r}")
        _check(self.batch_size > 0, "synthesis.batch_size", f"must be positive, got {self.batch_size}")
        _check(self.concurrency > 0, "synthesis.concurrency", f"must be positive, got {self.concurrency}")
        _check(self.max_new_tokens > 0, "synthesis.max_new_tokens",
               f"must be positive, got {self.max_new_tokens}")
        _check(self.temperature >= 0, "synthesis.temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "synthesis.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "synthesis.dtype",
               f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _check(self.openai_qps is None or self.openai_qps > 0, "synthesis.openai_qps",
               f"must be positive or null, got {self.openai_qps}")
        _check(self.openai_max_retries >= 0, "synthesis.openai_max_retries",
               f"must be >= 0, got {self.openai_max_retries}")
        _check(self.openai_max_in_flight > 0, "synthesis.openai_max_in_flight",
               f"must be positive, got {self.openai_max_in_flight}")
        _check(self.vllm_max_model_len > 0, "synthesis.vllm_max_model_len",
               f"must be positive, got {self.vllm_max_model_len}")
        self._check_filters()


@dataclass
class TrainConfig:
    mode: str = "per_culture"
    """per_culture, joint, continual or multitask."""
    preset: str | None = None
    """culturespa or clca: fill LoRA/optimizer settings from the seed papers."""
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names, or ["all-linear"]."""
    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"
    packing: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    deepspeed: dict | None = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    """DeepSpeed config (merged over defaults); None = plain torch DDP."""
    max_parallel_trials: int | None = None
    """None = derived from cluster resources."""
    max_failures: int = 1
    checkpoint_every_steps: int = 0
    """0 = once per epoch."""
    joint_baseline: bool = True
    """Also train the all-culture adapter (paper ablation) next to the per-culture ones."""
    tasks: list[str] | None = None
    """Task partitions to train on (per_culture, joint); None = the run's `tasks`. multitask
    mode always mixes every task partition of the culture."""
    continual_first: list[str] = field(default_factory=list)
    """continual mode: tasks of the first phase (culture SFT on general / task-agnostic data);
    the remaining `tasks` form the second phase (task adaptation)."""
    joint_system_prompt: str | None = "You are a person from {culture_name}."
    """joint adapters: system prompt naming each sample's culture (CultureSPA culture-joint);
    used when a conversation has no system message. None = none added."""
    cpus_per_worker: float = 1.0
    """Logical CPUs per Train worker."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = the epochs decide); for smoke runs and benches."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (0 = data order)."""
    max_grad_norm: float = 1.0

    def __post_init__(self):
        _check(self.lora_r > 0, "train.lora_r", f"must be positive, got {self.lora_r}")
        _check(self.lora_alpha > 0, "train.lora_alpha", f"must be positive, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "train.lora_dropout",
               f"must be in [0, 1), got {self.lora_dropout}")
        _check(len(self.target_modules) > 0, "train.target_modules", "must name at least one module")
        _check(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        _check(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        _check(self.batch_size > 0, "train.batch_size", f"must be positive, got {self.batch_size}")
        _check(self.grad_accum > 0, "train.grad_accum", f"must be positive, got {self.grad_accum}")
        _check(self.max_seq_len >= 16, "train.max_seq_len", f"must be >= 16, got {self.max_seq_len}")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio",
               f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.scheduler in ("cosine", "linear", "constant", "constant_with_warmup"),
               "train.scheduler", f"must be cosine, linear, constant or constant_with_warmup, "
               f"got {self.scheduler!r}")
        _check(self.num_workers > 0, "train.num_workers", f"must be positive, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker",
               f"must be positive, got {self.cpus_per_worker}")
        _check(self.max_parallel_trials is None or self.max_parallel_trials > 0,
               "train.max_parallel_trials", f"must be positive, got {self.max_parallel_trials}")
        _check(self.max_failures >= 0, "train.max_failures", f"must be >= 0, got {self.max_failures}")
        _check(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps",
               f"must be >= 0, got {self.checkpoint_every_steps}")
        _check(self.max_steps >= 0, "train.max_steps", f"must be >= 0, got {self.max_steps}")
        _check(self.preset in (None, "culturespa", "clca"), "train.preset",
               f"must be culturespa, clca or null, got {self.preset!r}")
        _check(self.mode in ("per_culture", "joint", "continual", "multitask"), "train.mode",
               f"must be per_culture, joint, continual or multitask, got {self.mode!r}")
        _check(self.mode != "continual" or bool(self.continual_first), "train.continual_first",
               "continual mode needs the tasks of its first phase (culture SFT data)")
        if self.deepspeed is not None:
            stage = (self.deepspeed.get("zero_optimization") or {}).get("stage", 2)
            _check(stage in (0, 1, 2, 3), "train.deepspeed.zero_optimization.stage",
                   f"must be 0, 1, 2 or 3, got {stage!r}")


@dataclass
class RouterConfig:
    kind: str = "embedding"
    """embedding (MiniLM + linear head) or header (explicit model / X-Culture / culture field only;
    everything else goes to the base model)."""
    threshold: float = 0.4
    """Below this calibrated probability the request goes to the base model (`none`)."""
    use_metadata: bool = True
    """Use a declared country / language when the request carries one."""
    c: float = 10.0
    """Inverse L2 strength of the logistic-regression head (sklearn's C)."""

    def __post_init__(self):
        _check(self.kind in ("embedding", "header"), "router.kind",
               f"must be embedding or header, got {self.kind!r}")
        _check(0.0 <= self.threshold <= 1.0, "router.threshold",
               f"must be a probability in [0, 1], got {self.threshold}")
        _check(self.c > 0, "router.c", f"must be positive, got {self.c}")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_adapters_per_replica: int = 8
    num_replicas: int | str = 1
    """An int, or "auto" to use autoscaling below."""
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: int = 8
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_prompt_chars: int = 8000
    max_new_tokens: int = 128
    api_key_env: str | None = None
    """Name of the env var holding a Bearer key; None = no auth."""
    ray_actor_cpus: float = 1.0
    """CPUs reserved per adapter-server replica."""
    num_gpus: float = 0.0
    """GPUs per adapter-server replica; > 0 puts the base model on CUDA (bfloat16)."""
    max_ongoing_requests: int = 32
    """Requests one adapter-server replica accepts at once (must cover max_batch_size)."""
    app_name: str = "cm_ray"
    """Serve application name (several apps can share one Serve instance)."""
    demo_prompt: str | None = None
    """Prompt of the demo request `cm-ray serve` sends; None = a validation input from synth/."""
    request_timeout_s: float = 120.0
    """Client timeout of the demo request."""

    def __post_init__(self):
        _check(isinstance(self.num_replicas, int) and self.num_replicas >= 1
               or self.num_replicas == "auto", "serve.num_replicas",
               f"must be a positive integer or 'auto', got {self.num_replicas!r}")
        _check(1 <= self.min_replicas <= self.max_replicas, "serve.min_replicas",
               f"must be >= 1 and <= serve.max_replicas, got {self.min_replicas}")
        for name in ("max_adapters_per_replica", "max_batch_size", "max_prompt_chars",
                     "max_new_tokens", "target_ongoing_requests"):
            _check(getattr(self, name) >= 1, f"serve.{name}",
                   f"must be >= 1, got {getattr(self, name)}")
        _check(self.max_ongoing_requests >= self.max_batch_size, "serve.max_ongoing_requests",
               f"must be >= serve.max_batch_size ({self.max_batch_size}) or batches never fill")
        _check(self.num_gpus >= 0, "serve.num_gpus", f"must be >= 0, got {self.num_gpus}")
        _check(0 < self.port < 65536, "serve.port", f"must be a TCP port, got {self.port}")
        _check(self.route_prefix.startswith("/"), "serve.route_prefix",
               f"must start with '/', got {self.route_prefix!r}")


RECIPE_OPTIONS: dict[str, dict[str, Any]] = {
    "culturemanager": {},
    "culturespa": {"questions_per_topic": int, "topics": list[Any], "rounds": int, "real_examples": int,
                   "generated_examples": int, "question_max_new_tokens": int},
    "clca": {"scenarios_per_culture": int, "max_turns": int, "turn_max_new_tokens": int,
             "judge_max_new_tokens": int, "turn_format": ("json", "text")},
}
"""Known ``recipe_options`` per recipe: a type (checked as config fields are), or the allowed values."""


def _check_recipe_options(recipe: str, options: dict) -> None:
    known = RECIPE_OPTIONS.get(recipe, {})
    for key, value in options.items():
        where = f"recipe_options.{key}"
        _check(key in known, where, f"unknown option for recipe {recipe} (known: {', '.join(sorted(known)) or 'none'})")
        want = known[key]
        if isinstance(want, tuple):
            _check(value in want, where, f"must be one of {', '.join(want)}, got {value!r}")
            continue
        _coerce(value, want, where)
        if want is int:
            _check(value >= 0, where, f"expected a non-negative integer, got {value!r}")


@dataclass
class EvalConfig:
    data_dir: str | None = None
    """Root of the public evaluation data; None = ../shared/data when present."""
    systems: list[str] = field(default_factory=lambda: [
        "base", "prompted", "joint", "culturemanager", "oracle"])
    max_questions: int | None = 50
    """Per culture and benchmark; None = all."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% confidence intervals (0 = none)."""
    benchmarks: list[str] = field(default_factory=lambda: ["wvs", "culture_tasks", "blend", "router"])
    """wvs (WVS alignment), culture_tasks (offensive-style classification), blend (short answers),
    router (routing accuracy on held-out culture-marked text)."""
    wvs_subset: str = "auto"
    """all (every WVS question with answers), clca (Q1-Q45 without Q42) or auto (clca for the
    clca recipe, else all)."""
    max_new_tokens: int = 24
    """Greedy tokens for short answers (BLEnD)."""
    batch_size: int = 8
    ablation: bool = False
    """`cm-ray evaluate CONFIG evaluate.ablation=true`: run the ablation variants, each in its own
    root under <root>/ablation/<variant>, evaluate each and write one comparison table."""
    ablation_variants: list[str] = field(default_factory=lambda: [
        "both", "specific_only", "agnostic_only", "all_culture", "sft_adaptation"])
    """Subset of: both (TaskSFT, per-culture adapters), specific_only, agnostic_only,
    all_culture (one joint adapter), sft_adaptation (train.mode=continual)."""

    def __post_init__(self):
        known = {"wvs", "culture_tasks", "blend", "router"}
        for b in self.benchmarks:
            _check(b in known, "evaluate.benchmarks", f"unknown benchmark {b!r} (known: {sorted(known)})")
        systems = {"base", "prompted", "joint", "culturemanager", "oracle"}
        for s in self.systems:
            _check(s in systems, "evaluate.systems", f"unknown system {s!r} (known: {sorted(systems)})")
        _check(self.wvs_subset in ("auto", "all", "clca"), "evaluate.wvs_subset",
               f"must be auto, all or clca, got {self.wvs_subset!r}")
        _check(self.max_questions is None or self.max_questions > 0, "evaluate.max_questions",
               f"must be positive or null, got {self.max_questions}")
        variants = {"both", "specific_only", "agnostic_only", "all_culture", "sft_adaptation"}
        for v in self.ablation_variants:
            _check(v in variants, "evaluate.ablation_variants",
                   f"unknown variant {v!r} (known: {sorted(variants)})")


@dataclass
class Config:
    name: str = "demo"
    """Run name; also the manifest name."""
    root: str = "artifacts/demo"
    """Artifact root: a local path or s3://bucket/prefix."""
    recipe: str = "culturemanager"
    """culturemanager, culturespa or clca."""
    cultures: list[str] = field(default_factory=lambda: ["GB", "CN", "MX"])
    """Culture keys (ISO 3166-1 alpha-2). Aliases (alpha-3, names) are normalised at load."""
    tasks: list[str] = field(default_factory=lambda: ["offensive", "survey"])
    """Task spec names (cm_ray/tasks/*.yaml) or paths to task YAMLs."""
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    recipe_options: dict = field(default_factory=dict)
    """Settings of the CultureSPA / CLCA recipes (see RECIPE_OPTIONS), checked at load."""

    def __post_init__(self):
        from cm_ray.cultures import normalize_culture

        _check(self.recipe in ("culturemanager", "culturespa", "clca"), "recipe",
               f"must be culturemanager, culturespa or clca, got {self.recipe!r}")
        _check_recipe_options(self.recipe, self.recipe_options)
        _check(len(self.cultures) > 0, "cultures", "must list at least one culture")
        keys = []
        for i, c in enumerate(self.cultures):
            try:
                keys.append(normalize_culture(c))
            except KeyError as e:
                raise ConfigError(f"cultures[{i}]: {e.args[0]}") from None
        _check(len(set(keys)) == len(keys), "cultures", f"duplicate cultures in {self.cultures}")
        self.cultures = keys
        _check(bool(self.root), "root", "must be a local path or s3:// URI")
        if "://" not in self.root:
            # Resolve against the loading process's cwd once, so Ray workers (Tune trials, Serve
            # replicas) that run elsewhere see the same directory.
            import os

            self.root = os.path.abspath(os.path.expanduser(self.root))
        else:
            _check(self.root.startswith("s3://"), "root", f"only local paths and s3:// are supported, got {self.root!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with types checked and errors naming the field.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), path or "<root>", f"expected a mapping, got {value!r}")
        return build(tp, value, path)
    if origin is list:
        _check(isinstance(value, list), path, f"expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        _check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        _check(isinstance(value, bool), path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), path,
               f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), path,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), path, f"expected a string, got {value!r}")
        return value
    return value


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{path}.{f.name}" if path else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a mapping")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a run config from YAML (None = all defaults) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides)
    return build(Config, data)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. inside Ray workers)."""
    return build(Config, data)
