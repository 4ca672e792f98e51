"""Evaluation on Ray actors: ``evaluate.workers`` actors, each loading the base model and the run's
adapters once, where its resources are (``evaluate.num_gpus`` > 0: a GPU worker, bfloat16 on CUDA).

The driver keeps the router and the benchmark logic; ``RemoteEvalModel`` has ``EvalModel``'s
interface (``adapters``, ``score``, ``generate``) and splits each call's conversations between the
actors in contiguous slices, so the answers come back in order. Adapters are resolved and, on
``s3://``, downloaded by each actor on its own node (the driver's temp dir is not theirs).
"""

from __future__ import annotations

from typing import Any, Sequence


class EvalWorker:
    """One base model + adapters on one Ray actor (``EvalModel`` underneath)."""

    def __init__(self, model_ref: str, cache_dir: str | None, root: str, names: Sequence[str],
                 batch_size: int, use_gpu: bool):
        from cm_ray.eval import systems as S
        from cm_ray.models import resolve_model
        from cm_ray.storage import ArtifactStore

        dirs, self._tmp = S.load_adapters(ArtifactStore(root), names)
        self.model = S.EvalModel(resolve_model(model_ref, cache_dir), dirs, batch_size, use_gpu=use_gpu)

    def info(self) -> dict:
        """Where this actor runs and what it loaded (node, GPUs Ray gave it, torch device)."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "device": self.model.device, "adapters": list(self.model.adapters)}

    def score(self, conversations, choices, adapter=None):
        return self.model.score(conversations, choices, adapter)

    def generate(self, conversations, adapter=None, max_new_tokens: int = 24):
        return self.model.generate(conversations, adapter, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        from cm_ray.eval import systems as S

        S.cleanup(self._tmp)


def _slices(n: int, k: int) -> list[slice]:
    step = -(-n // k) if n else 0
    return [slice(i, min(n, i + step)) for i in range(0, n, step)] if n else []


class RemoteEvalModel:
    """``EvalModel``'s interface over a pool of ``EvalWorker`` actors (see the module docstring)."""

    def __init__(self, actors: list):
        import ray

        self.actors = actors
        self.workers = ray.get([a.info.remote() for a in actors])
        self.adapters = self.workers[0]["adapters"]

    def _map(self, method: str, conversations: list, *per_item: list, **kwargs) -> list:
        import ray

        parts = _slices(len(conversations), len(self.actors))
        refs = [getattr(a, method).remote(conversations[s], *[x[s] for x in per_item], **kwargs)
                for a, s in zip(self.actors, parts)]
        return [o for out in ray.get(refs) for o in out]

    def score(self, conversations, choices, adapter=None):
        return self._map("score", list(conversations), list(choices), adapter=adapter)

    def generate(self, conversations, adapter=None, max_new_tokens: int = 24):
        return self._map("generate", list(conversations), adapter=adapter, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        import ray

        ray.get([a.close.remote() for a in self.actors])
        for a in self.actors:
            ray.kill(a)


def start_eval_workers(cfg: Any, store: Any, names: Sequence[str]) -> RemoteEvalModel:
    """``evaluate.workers`` actors with the resources ``cm_ray.resources`` gives the stage."""
    import ray

    from cm_ray.ray_utils import init_ray
    from cm_ray.resources import evaluate_request

    init_ray(cfg)
    ev = cfg.evaluate
    (bundle,) = evaluate_request(cfg).bundles
    cls = ray.remote(EvalWorker).options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0))
    actors = [cls.remote(cfg.models.base or cfg.models.generator, cfg.models.cache_dir, store.root,
                         list(names), ev.batch_size, ev.num_gpus > 0) for _ in range(ev.workers)]
    return RemoteEvalModel(actors)
