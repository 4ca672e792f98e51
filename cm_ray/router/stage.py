"""Stage ``route``: train the culture router on the synthetic inputs, save it under ``router/``.

The (input, culture) pairs come from the synth contract (``artifacts.read_synth``); the fit runs in
one Ray task that receives only the router section, the model refs, the seed and the root.
"""

from __future__ import annotations

import time

from cm_ray import artifacts


def synth_pairs(store) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(input, culture) pairs from ``synth/``, split into train and validation."""
    if not store.exists(*artifacts.synth_dir()):
        raise FileNotFoundError(f"no synthetic data at {store.uri(*artifacts.synth_dir())}: "
                                f"run synthesize first")
    table = artifacts.read_synth(store, columns=["culture", "split", "input"]).to_pylist()
    train = [(r["input"], r["culture"]) for r in table if r["input"] and r["split"] != "validation"]
    val = [(r["input"], r["culture"]) for r in table if r["input"] and r["split"] == "validation"]
    return train, val


def _fit_and_save(router_cfg, models, seed: int, store, cultures: list[str] | None = None) -> dict:
    """Fit on the store's synthetic pairs; write the router and its metrics under ``router/``.
    ``cultures``: every culture to route to (those without rows route on language + mention)."""
    from cm_ray.router.model import Encoder, train_router

    t0 = time.time()
    train, val = synth_pairs(store)
    if not train:
        raise ValueError(f"{store.uri(*artifacts.synth_dir())} holds no training rows")
    encoder = Encoder(models.encoder, models.cache_dir, int8=router_cfg.encoder_int8)
    router, metrics = train_router(train, val, encoder, router_cfg.threshold,
                                   router_cfg.use_metadata, router_cfg.c, seed, cultures,
                                   tuple(router_cfg.evidence), router_cfg.skip_content_at)
    metrics["seconds"] = round(time.time() - t0, 1)
    router.save(store, *artifacts.router_dir(), metrics=metrics)  # head, config, metrics: one version
    return metrics


def _fit_remote(router_cfg, models, seed: int, root: str, cultures: list[str]) -> dict:
    """The Ray task: the router section, the model refs, the seed, the root and the cultures."""
    from cm_ray.storage import ArtifactStore

    return _fit_and_save(router_cfg, models, seed, ArtifactStore(root), cultures)


def run_router_training(cfg, store, force: bool = False) -> dict:
    """Stage ``route``: train the router on the synthetic inputs and save it under ``router/``.

    The fit runs in one Ray task (1 CPU), not in the driver: reading every synthetic input and
    loading the encoder there would make the driver's memory grow with the number of cultures.
    """
    import ray

    from cm_ray.ray_utils import init_ray

    init_ray(cfg)
    task = ray.remote(num_cpus=1, max_retries=1)(_fit_remote)
    metrics = ray.get(task.remote(cfg.router, cfg.models, cfg.seed, store.root, list(cfg.cultures)))
    return {"cultures": len(metrics["cultures"]), "n_train": metrics["n_train"],
            "n_validation": metrics["n_validation"], "accuracy": metrics["accuracy"],
            "ece": metrics.get("ece"), "router": store.uri(*artifacts.router_dir()),
            "zero_row_cultures": metrics.get("zero_row_cultures", []),
            "headline": f"router accuracy {metrics['accuracy'] or 0:.2f} on {metrics['n_validation']} "
                        f"synthetic validation inputs, {len(metrics['cultures'])} cultures "
                        f"(real-text accuracy: the evaluation's router benchmark)"}
