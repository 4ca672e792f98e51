"""What each stage asks Ray for, from the config and the cluster's configured capacity.

One place decides every request, and both the stages and ``cm-ray plan`` read it:

  synthesize  engine replicas: vLLM = ``synthesis.vllm.tensor_parallel_size`` bundles of
              {GPU: 1, CPU: cpus_per_replica} (STRICT_PACK: one node), or one {CPU} bundle on CPU;
              transformers = {GPU: 1} or {CPU} per replica. ``synthesis.accelerator: auto`` = GPU
              when the cluster can have GPUs (``cm_ray.cluster``), never the driver's hardware.
  train       per trial ``train.num_workers`` bundles of {CPU: cpus_per_worker (+ GPU: 1)};
              ``train.max_parallel_trials`` at once, or as many as the cluster holds at its
              largest (nodes the autoscaler can still add included).
  serve       adapter-server replicas {CPU: ray_actor_cpus, GPU: num_gpus}; one ingress.
  evaluate    ``evaluate.workers`` actors of {CPU: num_cpus, GPU: num_gpus}, one model load each.

Pure Python (no Ray import): the cluster is passed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cm_ray.cluster import Cluster


class PlacementError(ValueError):
    """A stage asks for something no node type of the cluster can give."""


@dataclass
class Request:
    stage: str
    what: str
    """The Ray object that holds it: an actor pool replica, a trial's worker group, ..."""
    bundles: list[dict[str, float]]
    """One group's bundles (a replica, a trial): each must fit on one node."""
    count: int
    """Groups at once (the most, for autoscaled deployments)."""
    strategy: str = "PACK"
    gpu_bound: bool = False
    note: str = ""

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v * self.count
        return out

    def placed(self) -> list[dict[str, float]]:
        """What must each fit on one node: the whole group under STRICT_PACK, else each bundle."""
        if self.strategy != "STRICT_PACK" or not self.bundles:
            return self.bundles
        merged: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                merged[k] = merged.get(k, 0.0) + v
        return [merged]

    def to_dict(self) -> dict:
        return asdict(self) | {"totals": self.totals()}


def _clean(b: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in b.items() if v}


def synthesis_uses_gpu(cfg, cluster: Cluster | None) -> bool:
    """Whether the engine replicas run on GPUs (``synthesis.accelerator``; auto = cluster has GPUs)."""
    acc = cfg.synthesis.accelerator
    if acc != "auto":
        return acc == "gpu"
    return bool(cluster and cluster.has_gpus())


def engine_bundles(cfg, gpu: bool, engine: str | None = None) -> list[dict[str, float]]:
    """One engine replica's placement-group bundles."""
    s = cfg.synthesis
    if (engine or s.engine) == "vllm" and gpu:
        return [_clean({"GPU": 1, "CPU": s.cpus_per_replica})] * s.vllm.tensor_parallel_size
    if (engine or s.engine) == "openai":
        return [{"CPU": 0.25}]
    return [_clean({"CPU": s.cpus_per_replica, "GPU": 1 if gpu else 0})]


def synthesis_request(cfg, gpu: bool, stage: str = "synthesize") -> Request:
    s = cfg.synthesis
    what = {"vllm": "vLLM engine replica (ray.data.llm)", "transformers": "transformers engine replica",
            "openai": "OpenAI-client replica"}[s.engine]
    return Request(stage, what, engine_bundles(cfg, gpu), s.concurrency,
                   "STRICT_PACK" if s.engine == "vllm" and gpu else "PACK",
                   gpu_bound=gpu and s.engine != "openai")


def trial_bundles(cfg) -> list[dict[str, float]]:
    tc = cfg.train
    return [_clean({"CPU": tc.cpus_per_worker, "GPU": 1 if tc.use_gpu else 0})] * tc.num_workers


def parallel_trials(cfg, cluster: Cluster | None, n_trials: int) -> int:
    """Trials at once: ``train.max_parallel_trials``, else what the cluster holds at its largest.

    On CPU one logical CPU stays free for the Ray Data tokenization of the next trial.
    """
    tc = cfg.train
    if tc.max_parallel_trials:
        return max(1, min(tc.max_parallel_trials, n_trials))
    if cluster is None:
        return 1
    bundles = trial_bundles(cfg)
    n = cluster.max_at_once(bundles)
    if not tc.use_gpu:
        cpus = cluster.max_resources().get("CPU", 1.0)
        n = min(n, int(max(1.0, cpus - 1.0) // (tc.num_workers * tc.cpus_per_worker)))
    return max(1, min(n, n_trials))


def train_request(cfg, cluster: Cluster | None, n_trials: int) -> Request:
    n = parallel_trials(cfg, cluster, n_trials)
    src = "train.max_parallel_trials" if cfg.train.max_parallel_trials else "cluster capacity"
    return Request("train", f"Train worker group of one trial ({cfg.train.num_workers} workers)",
                   trial_bundles(cfg), n, "PACK", gpu_bound=cfg.train.use_gpu,
                   note=f"{n_trials} trials, {n} at once ({src})")


def serve_requests(cfg) -> list[Request]:
    s = cfg.serve
    most = s.max_replicas if s.num_replicas == "auto" else s.num_replicas
    tp = s.vllm.tensor_parallel_size if s.engine == "vllm" else 1
    bundles = ([{"GPU": 1.0, "CPU": 1.0}] * tp if s.num_gpus and tp > 1
               else [_clean({"CPU": s.ray_actor_cpus, "GPU": s.num_gpus})])  # as serve/app.py asks
    note = (f"{s.engine}; autoscaled {s.min_replicas}..{s.max_replicas}" if s.num_replicas == "auto"
            else f"{s.engine}; {s.num_replicas} fixed")
    return [Request("serve", "adapter-server replica", bundles, most, gpu_bound=s.num_gpus > 0, note=note),
            Request("serve", "router ingress replica", [{"CPU": 1.0}], 1, note="MiniLM router on CPU")]


def evaluate_request(cfg) -> Request:
    ev = cfg.evaluate
    return Request("evaluate", "evaluation actor (one model load)",
                   [_clean({"CPU": ev.num_cpus, "GPU": ev.num_gpus})], ev.workers,
                   gpu_bound=ev.num_gpus > 0)


def stage_requests(cfg, cluster: Cluster | None, n_trials: int) -> list[Request]:
    """Every stage's requests for ``cfg`` (the data stages share the synthesis engine)."""
    gpu = synthesis_uses_gpu(cfg, cluster)
    reqs = []
    if cfg.recipe == "culturemanager":
        reqs.append(Request("search", "search actor (async HTTP)", [{"CPU": cfg.search.actor_cpus}],
                            cfg.search.concurrency))
        reqs.append(synthesis_request(cfg, gpu, "queries"))
    reqs.append(synthesis_request(cfg, gpu))
    reqs.append(train_request(cfg, cluster, n_trials))
    reqs.append(Request("route", "router fit (driver)", [], 0, note="MiniLM + logistic head in the driver"))
    reqs += serve_requests(cfg)
    reqs.append(evaluate_request(cfg))
    return reqs


def check(requests: list[Request], cluster: Cluster) -> None:
    """Raise ``PlacementError`` naming the stage and resource of a bundle no node type holds."""
    problems = []
    for r in requests:
        for b in r.placed():
            if not cluster.hosts(b):
                short = [k for k, v in b.items() if all(t.resources.get(k, 0.0) < v for t in cluster.node_types)]
                most = {k: max((t.resources.get(k, 0.0) for t in cluster.node_types), default=0.0) for k in short}
                problems.append(f"{r.stage}: {r.what} needs {b} on one node; no node type of "
                                f"{cluster.source} has it ({', '.join(f'{k}: at most {most[k]:g} per node' for k in short) or 'no single node has all of it'})")
    if problems:
        raise PlacementError("; ".join(problems))
