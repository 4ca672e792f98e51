"""Packed training (``train.trials: packed``): many culture adapters per trial and base-model load.

One trial per adapter pays a Train worker start-up, a base-model load and a DeepSpeed
initialisation for every culture, which dominates at hundreds of small cultures. Here the cultures
are packed into a few trials:

* ``culture_tokens`` counts each culture's tokens from its synth rows (the base model's tokenizer
  over the message texts); a culture whose synth files cannot be read fails here, on its own.
* ``balanced_packs`` puts the cultures into N bins, largest first into the lightest bin (LPT), so
  the packs take about the same time; N is ``train.packs``, or as many trials as run at once
  (``max_concurrent_trials``), raised so no pack exceeds ``train.max_adapters_per_pack``.
* every pack is one Tune trial running one Ray Train ``TorchTrainer`` whose workers train all its
  adapters on one loaded base model (``train.pack_worker``); the joint adapter, which reads every
  culture, keeps a trial of its own in the same Tune run.

A culture whose rows fail to tokenize, or that keeps no training rows, is dropped from its pack
with its own error; the rest of the pack trains (``train.pack_data``).
"""

from __future__ import annotations

import json
import math
import time
import uuid

from cm_ray import artifacts

PACK_PREFIX = "pack"


def attempt_ids(store, names: list[str]) -> dict[str, str]:
    """Each adapter's attempt id, which names its Ray Train run (and so its checkpoints): the
    version its fingerprint record gives it (``cm_ray.fingerprints``: the same again when a stopped
    job is submitted again, so training resumes from the last checkpoint; new when its inputs
    change or under ``--force``), or one fresh id for adapters without a record."""
    parts = artifacts.fingerprints_file("train")
    try:
        records = store.read_json(*parts) if store.exists(*parts) else {}
    except (OSError, ValueError):
        records = {}
    fresh = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return {n: str((records.get(n) or {}).get("version") or "")[:12] or fresh for n in names}


def pack_run_name(index: int, members: list[str], ids: dict[str, str]) -> str:
    """The Ray Train run name of a pack: from its members' attempt ids (same pack, same name)."""
    return f"{PACK_PREFIX}{index}-{artifacts.stable_id(sorted((n, ids[n]) for n in members), n=12)}"


def culture_tokens(store, tok, sources: dict[str, list]) -> tuple[dict[str, int], dict[str, str]]:
    """Token count of each adapter's synth rows (all phases) and the adapters whose data failed.

    Args:
        tok: the base model's tokenizer; counts are the tokens of the messages' texts.
        sources: adapter -> phases of (culture, tasks) partitions (``tune._phase_sources``).
    Returns:
        ({adapter: tokens}, {adapter: error}).
    """
    import pyarrow.parquet as pq

    counts, errors = {}, {}
    for name, phases in sources.items():
        try:
            texts = []
            for phase in phases:
                for culture, tasks in phase:
                    for path in artifacts.synth_files(store, culture, tasks):
                        col = pq.read_table(path, filesystem=store.fs, columns=["messages"]).column(0)
                        texts += [str(m.get("content", "")) for conv in col.to_pylist() for m in conv or []]
            counts[name] = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]) \
                if texts else 0
        except Exception as e:  # unreadable or malformed partition: this culture only
            errors[name] = f"{type(e).__name__}: {str(e).strip()[-500:]}"
    return counts, errors


def balanced_packs(weights: dict[str, int], n_packs: int, max_per_pack: int | None = None) -> list[list[str]]:
    """Greedy largest-first bin packing of adapters (by token count) into ``n_packs`` bins.

    Each adapter goes to the lightest bin that has room (ties: the lower index); the number of
    bins is raised to ``ceil(len / max_per_pack)`` when a cap is given, and empty bins are dropped.
    Deterministic: ties between equal weights are broken by name.
    """
    if n_packs < 1:
        raise ValueError(f"n_packs must be positive, got {n_packs}")
    n = len(weights)
    if max_per_pack:
        n_packs = max(n_packs, math.ceil(n / max_per_pack))
    n_packs = min(n_packs, n) or 1
    bins: list[list[str]] = [[] for _ in range(n_packs)]
    load = [0] * n_packs
    for name in sorted(weights, key=lambda k: (-weights[k], k)):
        open_bins = [i for i in range(n_packs) if not max_per_pack or len(bins[i]) < max_per_pack]
        i = min(open_bins, key=lambda j: (load[j], j))
        bins[i].append(name)
        load[i] += weights[name]
    return [b for b in bins if b]


def _pack_trial(params: dict, train, model_ref: str, cache_dir: str | None, root: str, seed: int,
                sources: dict, run_id: str | dict, fault: dict | None, single_trial) -> None:
    """Tune trial: a pack of culture adapters, or (``params["adapter"]``) one adapter alone."""
    unit = params["unit"]
    if "adapter" in unit:
        single_trial({"adapter": unit["adapter"]}, train, model_ref, cache_dir, root, seed, sources,
                     run_id, fault)
        return
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from cm_ray.ray_utils import quiet_data_progress
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.pack_data import build_pack_dataset
    from cm_ray.train.pack_worker import packed_train_fn_per_worker
    from cm_ray.train.setup import torch_backend

    tc, store = train, ArtifactStore(root)
    quiet_data_progress()
    members = unit["adapters"]
    ds, errors = build_pack_dataset(tc, model_ref, store,  # resolved where it is tokenized
                                    {n: sources[n] for n in members})
    run_name = unit["run_name"]
    keep = [n for n in members if n not in errors]
    if not keep:  # nothing left to train: report every culture's own error and end the trial
        tune.report({"adapter_errors": json.dumps(errors)})
        return
    spec = {"train": tc, "seed": seed, "model_ref": model_ref, "cache_dir": cache_dir, "root": root,
            "adapters": keep, "data_errors": errors, "run_name": run_name, "pack": unit["pack"],
            "fault": {n: f for n, f in (fault or {}).items() if n in keep}}
    trainer = TorchTrainer(
        packed_train_fn_per_worker, train_loop_config=spec, datasets={"pack": ds},
        torch_config=TorchConfig(backend=torch_backend(tc)),
        # Every worker reads the whole pack and takes its own equal share of each adapter's rows,
        # so all workers step the same adapters the same number of times (collectives line up).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=store.fs_path(*artifacts.checkpoints_dir()),
            storage_filesystem=store.fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]))
    trainer.fit()


def _published_metrics(store, name: str) -> dict | None:
    got = artifacts.published_adapter(store, name)
    if got is None or not all(store.exists(*got[0], f) for f in ("adapter_model.safetensors", "metrics.json")):
        return None
    return store.read_json(*got[0], "metrics.json")


def run_packed_trials(cfg, store, names: list[str], capacity, single_trial, sources: dict,
                      fault: dict | None = None) -> tuple[dict[str, dict], list[list[str]]]:
    """Train ``names`` with the cultures packed into trials (the joint adapter in a trial of its own).

    Args:
        capacity: ``n_trials -> trials that run at once`` (``tune.max_concurrent_trials``).
        single_trial: the one-adapter trial function (``tune._trial``), for the joint adapter.
        sources: adapter -> phase sources (``tune._phase_sources``).
        fault: test hook, ``{culture: {"at_step": k, "marker": path}}``: the pack's worker exits hard
            once when that culture's adapter reaches step k.
    Returns:
        (``{name: {"status": "ok", "metrics"} | {"status": "failed", "error"}}``, the packs).
    """
    from ray import tune

    from cm_ray.models import resolve_model
    from cm_ray.progress import trial_callback
    from cm_ray.train.data import get_tokenizer

    tc = cfg.train
    singles = [n for n in names if n == artifacts.JOINT]
    cultures = [n for n in names if n not in singles]
    model_ref = cfg.models.base or cfg.models.generator
    out: dict[str, dict] = {}
    packs: list[list[str]] = []
    if cultures:
        tok = get_tokenizer(resolve_model(model_ref, cfg.models.cache_dir))
        counts, errors = culture_tokens(store, tok, {n: sources[n] for n in cultures})
        out.update({n: {"status": "failed", "error": e} for n, e in errors.items()})
        if counts:
            packs = balanced_packs(counts, tc.packs or capacity(len(counts)), tc.max_adapters_per_pack)
    ids = attempt_ids(store, names)
    units = [{"pack": i, "adapters": p, "run_name": pack_run_name(i, p, ids)} for i, p in enumerate(packs)] \
        + [{"adapter": n} for n in singles]
    if not units:
        return out, packs
    run_id = ids  # the one-adapter trial names its run after its adapter's attempt id
    inputs = {"train": tc, "model_ref": model_ref, "cache_dir": cfg.models.cache_dir, "root": store.root,
              "seed": cfg.seed, "sources": sources, "run_id": run_id, "fault": fault,
              "single_trial": single_trial}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_pack_trial, **inputs), {"CPU": 0.01}),
        param_space={"unit": tune.grid_search(units)},
        tune_config=tune.TuneConfig(max_concurrent_trials=capacity(len(units))),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", storage_path=store.fs_path(*artifacts.checkpoints_dir()),
                                  storage_filesystem=store.fs, verbose=0, callbacks=[trial_callback(len(units))],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    for result in tuner.fit():
        unit = result.config["unit"]
        members = unit["adapters"] if "pack" in unit else [unit["adapter"]]
        run_name = unit["run_name"] if "pack" in unit else f"{unit['adapter']}-{ids[unit['adapter']]}"
        own = json.loads((result.metrics or {}).get("adapter_errors") or "{}")
        for n in members:
            m = _published_metrics(store, n)
            if n in own:
                out[n] = {"status": "failed", "error": own[n]}
            elif result.error is None and m is not None and m.get("run_name") == run_name:
                out[n] = {"status": "ok", "metrics": m}
            else:
                err = result.error or RuntimeError("trial ended without a complete adapter")
                out[n] = {"status": "failed",
                          "error": f"{type(err).__name__}: {str(err).strip()[-500:]}"}
    return out, packs
