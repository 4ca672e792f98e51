"""The train stage: one Ray Tune trial per culture, each a Ray Train ``TorchTrainer`` (DeepSpeed + LoRA),
or (``train.trials: packed``) cultures packed into a few trials of many adapters each (``train.pack``).

Modes (``train.mode``):
  per_culture  one adapter per culture on its ``train.tasks`` partitions (CultureManager;
               CultureSPA culture-specific). ``train.joint_baseline`` adds ``_joint`` beside them.
  joint        only ``adapters/_joint``: every culture's data with its culture system prompt
               (``artifacts.culture_system_prompt``, the one evaluation uses too)
               (the paper's all-culture ablation; CultureSPA culture-joint).
  continual    per culture, first ``train.continual_first`` tasks (culture SFT), then the remaining
               tasks (task adaptation), in one run with one LR schedule ("SFT+Adaptation").
  multitask    per culture, every task partition found (e.g. CLCA's dialogue + intent views) mixed.

Each trial reads its partitions through Ray Data, tokenizes them (loss on assistant tokens only),
materializes the token rows (on 2 cores a Data stage feeding running Train workers can starve) and
hands them to the trainer (at most ``train.local_tokenize_rows`` rows: the same UDFs in the trial's
process, then ``ray.data.from_arrow``), whose workers stream them with ``ray.train.get_dataset_shard``.
Checkpoints live under ``<root>/checkpoints/``; a failed worker group restarts from the last one.
A failing culture fails only its own trial; a rerun skips adapters that are complete unless forced.
"""

from __future__ import annotations

import time
import uuid

from cm_ray import artifacts
from cm_ray.artifacts import JOINT
from cm_ray.config import Config


def adapter_complete(store, name: str) -> bool:
    """Whether the current published version of ``name`` holds weights and metrics."""
    got = artifacts.published_adapter(store, name)
    return got is not None and all(store.exists(*got[0], f) for f in
                                   ("adapter_model.safetensors", "metrics.json"))


def adapter_names(cfg: Config) -> list[str]:
    """Adapters this config trains: cultures (+ ``_joint``), or only ``_joint`` in joint mode."""
    if cfg.train.mode == "joint":
        return [JOINT]
    return list(cfg.cultures) + ([JOINT] if cfg.train.joint_baseline else [])


def _phase_sources(cfg: Config, store, adapter: str) -> list[list[tuple[str, list[str]]]]:
    """Per training phase, the (culture, tasks) partitions it reads."""
    from cm_ray.tasks import load_task

    tc = cfg.train
    # Partitions are named by the spec's name: a task given as a YAML path is read by its name.
    name = {t: load_task(t).name for t in [*(tc.tasks or cfg.tasks), *tc.continual_first]}
    tasks = [name[t] for t in (tc.tasks or cfg.tasks)]
    first = [name[t] for t in tc.continual_first]
    if adapter == JOINT and tc.mode == "multitask":  # as its cultures: every task partition found
        return [[(c, artifacts.synth_tasks(store, c)) for c in cfg.cultures]]
    if adapter == JOINT:
        return [[(c, tasks) for c in cfg.cultures]]
    if tc.mode == "multitask":
        return [[(adapter, artifacts.synth_tasks(store, adapter))]]
    if tc.mode == "continual":
        rest = [t for t in tasks if t not in first]
        return [[(adapter, first)], [(adapter, rest)]] if rest else [[(adapter, first)]]
    return [[(adapter, tasks)]]


def has_data(cfg: Config, store, adapter: str) -> bool:
    """Whether every training phase of ``adapter`` has at least one synth file to read."""
    return all(any(artifacts.synth_files(store, c, tasks) for c, tasks in sources)
               for sources in _phase_sources(cfg, store, adapter))


def build_datasets(tc, model_path: str, store, adapter: str,
                   sources: list[list[tuple[str, list[str]]]]) -> tuple[dict, list[tuple[str, int]]]:
    """Tokenized, materialized Ray Datasets for one adapter: ``train_<i>`` per phase + ``validation``.

    ``sources`` are the adapter's phases (``_phase_sources``); the joint adapter's conversations
    get the culture system prompt (``artifacts.culture_system_prompt``) of each sample's culture.
    The synth files are listed once. With at most ``train.local_tokenize_rows`` rows in all, the
    same UDFs run in this process (``_tokenize_here``: no Ray Data workers to start for a few
    dozen rows); otherwise through Ray Data (``_tokenize_ray``).
    Returns (datasets, [(train dataset name, rows)]). Raises when a phase has no usable rows.
    """
    from cm_ray.train.data import synth_row_count

    kwargs = {"model_path": model_path, "max_seq_len": tc.max_seq_len}
    # A culture without synth files (its synthesis kept nothing) adds no rows: the joint adapter
    # trains on the others; a phase with no file at all is an error.
    listed = [[(c, paths) for c, tasks in phase if (paths := artifacts.synth_files(store, c, tasks))]
              for phase in sources]
    for phase, named in zip(sources, listed):
        if not named:
            raise FileNotFoundError(f"adapter {adapter}: no synth data for {phase} under "
                                    f"{store.uri(*artifacts.synth_dir())}")
    n_rows = synth_row_count(store, [p for phase in listed for _, paths in phase for p in paths])
    tokenize = _tokenize_here if n_rows <= tc.local_tokenize_rows else _tokenize_ray
    datasets, phase_rows, val = {}, [], []
    for i, phase in enumerate(listed):
        systems = [artifacts.culture_system_prompt(c) if adapter == JOINT else None for c, _ in phase]
        train, rows, validation = tokenize(tc, store, [paths for _, paths in phase], systems, kwargs)
        if rows == 0:
            raise ValueError(f"adapter {adapter}: no usable training rows in phase {i} ({sources[i]})")
        datasets[f"train_{i}"] = train
        phase_rows.append((f"train_{i}", rows))
        val.append(validation)
    validation = _union(val)
    if validation is not None and validation.count() >= tc.num_workers:
        datasets["validation"] = validation
    return datasets, phase_rows


def _union(datasets: list):
    """One materialized Ray Dataset of the non-empty ones, or None."""
    got = [d for d in datasets if d is not None]
    return (got[0].union(*got[1:]) if len(got) > 1 else got[0]).materialize() if got else None


def _tokenize_ray(tc, store, paths: list[list[str]], systems: list[str | None], kwargs: dict):
    """One phase through Ray Data tasks: (train dataset, train rows, validation dataset)."""
    from cm_ray.train.data import pack_rows, synth_dataset, tokenize_batch

    parts = [synth_dataset(store, p).map_batches(
        tokenize_batch, batch_format="numpy", batch_size=64, num_cpus=0.25,
        fn_kwargs={**kwargs, "system_prompt": system}) for p, system in zip(paths, systems)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if tc.packing:
        ds = ds.map_batches(pack_rows, batch_format="numpy", batch_size=256, num_cpus=0.25,
                            fn_kwargs={"max_seq_len": tc.max_seq_len})
    ds = ds.materialize()
    train = ds.filter(lambda r: r["split"] != "validation").materialize()
    return train, train.count(), ds.filter(lambda r: r["split"] == "validation")


def _tokenize_here(tc, store, paths: list[list[str]], systems: list[str | None], kwargs: dict):
    """``_tokenize_ray`` for few rows: the same UDFs, in file order, in this process."""
    import numpy as np

    from cm_ray.train.data import dataset_from_columns, pack_rows, read_synth_batch, tokenize_batch

    parts = [tokenize_batch(read_synth_batch(store, p), system_prompt=system, **kwargs)
             for p, system in zip(paths, systems)]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if tc.packing:
        cols = pack_rows(cols, tc.max_seq_len)
    is_val = cols["split"] == "validation"
    n_train = int((~is_val).sum())
    train = dataset_from_columns(cols, ~is_val) if n_train else None
    return train, n_train, dataset_from_columns(cols, is_val) if is_val.any() else None


def _trial(params: dict, train, model_ref: str, cache_dir: str | None, root: str, seed: int,
           sources: dict, run_id: str | dict, fault: dict | None) -> None:
    """Tune trial (``{"CPU": 0.01}``): build the adapter's data, run its TorchTrainer to the end.

    Receives only its own inputs: the ``train`` section (preset applied), the base model ref and
    cache, the artifact root, the seed and each adapter's phase sources; no whole config.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from cm_ray.ray_utils import quiet_data_progress
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.loop import steps_plan
    from cm_ray.train.setup import torch_backend
    from cm_ray.train.worker import train_fn_per_worker

    tc, adapter = train, params["adapter"]
    run_name = f"{adapter}-{run_id[adapter] if isinstance(run_id, dict) else run_id}"
    store = ArtifactStore(root)
    quiet_data_progress()
    # the reference, not a path on this node: tokenizer tasks resolve it on theirs (get_tokenizer)
    datasets, phase_rows = build_datasets(tc, model_ref, store, adapter,
                                          sources[adapter])
    phases, total_steps = steps_plan(phase_rows, tc, tc.num_workers)
    spec = {"train": tc, "seed": seed, "model_ref": model_ref, "cache_dir": cache_dir, "root": root,
            "adapter": adapter, "phases": phases, "total_steps": total_steps, "rows": dict(phase_rows),
            "has_validation": "validation" in datasets, "run_name": run_name,
            "fault": (fault or {}).get(adapter)}
    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=spec, datasets=datasets,
        torch_config=TorchConfig(backend=torch_backend(tc)),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name,  # reusing a name resumes that run from its last checkpoint
            storage_path=store.fs_path(*artifacts.checkpoints_dir()), storage_filesystem=store.fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]))
    trainer.fit()


def max_concurrent_trials(cfg: Config, n_trials: int) -> int:
    """``train.max_parallel_trials``, or as many trials as the cluster holds at its largest: its
    configured node types and their max counts (``cm_ray.cluster``: nodes the autoscaler can still
    add count), not the resources free now (1 on a cluster that starts from zero workers)."""
    from cm_ray.cluster import for_config
    from cm_ray.resources import parallel_trials

    cluster = None if cfg.train.max_parallel_trials else for_config(cfg)
    return parallel_trials(cfg, cluster, n_trials)


def run_culture_trials(cfg: Config, store, names: list[str], fault: dict | None = None) -> dict[str, dict]:
    """Train ``names`` (culture keys / ``_joint``) as parallel Tune trials.

    Args:
        fault: test hook, ``{adapter: {"at_step": k, "marker": path}}``: that adapter's worker exits
            hard once at step k (marker file), so the resume path is exercised for real.
    Returns:
        ``{name: {"status": "ok", "metrics": {...}} | {"status": "failed", "error": str}}``.
    """
    from ray import tune

    from cm_ray.progress import trial_callback
    from cm_ray.train.pack import attempt_ids

    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trial_inputs = {"train": cfg.train, "model_ref": cfg.models.base or cfg.models.generator,
                    "cache_dir": cfg.models.cache_dir, "root": store.root, "seed": cfg.seed,
                    "sources": {n: _phase_sources(cfg, store, n) for n in names}}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, **trial_inputs, run_id=attempt_ids(store, names), fault=fault),
        {"CPU": 0.01})
    tuner = tune.Tuner(
        trainable, param_space={"adapter": tune.grid_search(names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials(cfg, len(names))),
        run_config=tune.RunConfig(name=f"tune-{run_id}", storage_path=store.fs_path(*artifacts.checkpoints_dir()),
                                  storage_filesystem=store.fs, verbose=0, callbacks=[trial_callback(len(names))],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    out: dict[str, dict] = {}
    for result in grid:
        name = result.config["adapter"]
        if result.error is None and adapter_complete(store, name):
            where = artifacts.published_adapter(store, name)[0]
            out[name] = {"status": "ok", "metrics": store.read_json(*where, "metrics.json")}
        else:
            err = result.error or RuntimeError("trial ended without a complete adapter")
            out[name] = {"status": "failed", "error": f"{type(err).__name__}: {str(err).strip()[-500:]}"}
    return out


def run_training(cfg: Config, store, force: bool = False, fault: dict | None = None) -> dict:
    """The train stage: adapters for every culture (and ``_joint``); summary for the CLI."""
    from cm_ray.ray_utils import init_ray

    names = adapter_names(cfg)
    skipped = [n for n in names if not force and adapter_complete(store, n)]
    todo = [n for n in names if n not in skipped]
    # Cultures whose synthesis kept nothing get no trial (each costs a worker start-up); the stage
    # stays incomplete so that a rerun after more synthesis picks them up.
    no_data = [n for n in todo if not has_data(cfg, store, n)]
    todo = [n for n in todo if n not in no_data]
    results, packs = {}, None
    if todo and cfg.train.trials == "packed":
        from cm_ray.train.pack import run_packed_trials

        init_ray(cfg)
        results, packs = run_packed_trials(cfg, store, todo, lambda n: max_concurrent_trials(cfg, n), _trial,
                                           {n: _phase_sources(cfg, store, n) for n in todo}, fault=fault)
    elif todo:
        init_ray(cfg)
        results = run_culture_trials(cfg, store, todo, fault=fault)
    ok = {n: r["metrics"] for n, r in results.items() if r["status"] == "ok"}
    failed = {n: r["error"] for n, r in results.items() if r["status"] == "failed"}
    per = {n: {k: m.get(k) for k in ("first_loss", "final_loss", "val_loss", "steps", "tokens_per_s",
                                     "resumed_from")} for n, m in ok.items()}
    tps = [m["tokens_per_s"] for m in ok.values() if m.get("tokens_per_s")]
    headline = f"{len(ok)} trained, {len(skipped)} skipped, {len(failed)} failed"
    losses = [(n, m["first_loss"], m["final_loss"]) for n, m in sorted(ok.items()) if m.get("final_loss") is not None]
    if len(losses) > 8:  # hundreds of cultures: the mean here, each one in per_adapter
        headline += (f"; loss mean {sum(x[1] for x in losses) / len(losses):.2f}->"
                     f"{sum(x[2] for x in losses) / len(losses):.2f} over {len(losses)} adapters")
    elif losses:
        headline += "; loss " + ", ".join(f"{n} {a:.2f}->{b:.2f}" for n, a, b in losses)
    if tps:
        headline += f"; {sum(tps) / len(tps):.0f} tok/s/trial"
    if packs:
        headline += f"; {len(packs)} pack(s) of {', '.join(str(len(p)) for p in packs)} adapters"
    if no_data:
        headline += f"; no synth data: {', '.join(no_data)}"
    if failed:
        headline += f"; FAILED: {', '.join(sorted(failed))}"
    return {"mode": cfg.train.mode, "trials": cfg.train.trials, "packs": packs, "adapters": names, "trained": sorted(ok), "skipped": skipped,
            "no_data": no_data, "failed": failed, "per_adapter": per,
            "tokens_per_s_mean": (sum(tps) / len(tps)) if tps else None,
            "complete": not failed and not no_data, "headline": headline}
