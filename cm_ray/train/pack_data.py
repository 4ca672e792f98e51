"""A pack's training data: every member culture's synth partitions in one Ray Data pipeline.

One read + tokenize + materialize for the whole pack (a pipeline per culture would cost more
than the training of a small culture); a pack of at most ``train.local_tokenize_rows`` rows runs the
same UDF in the trial's process. Rows carry their ``adapter`` and ``phase``; a row that fails
to tokenize becomes an error row, and a culture with any error row, or a phase without training
rows, is dropped from the pack with that error while the others train.
"""

from __future__ import annotations

import numpy as np

from cm_ray import artifacts
from cm_ray.train.data import (_as_columns, append_token_row, dataset_from_columns, get_tokenizer,
                              read_synth_batch, synth_row_count, tokenize_chat)


def tokenize_pack_batch(batch: dict[str, np.ndarray], model_path: str, max_seq_len: int,
                        units: dict[str, list]) -> dict[str, np.ndarray]:
    """Ray Data UDF: synth rows -> token rows tagged with their adapter and phase.

    Input columns:  messages, split, path (``include_paths``)
    Output columns: input_ids, labels, n_tokens, split, adapter, phase, error ("" = a good row)

    ``units`` maps a partition file (its path as ``store.fs`` names it) to [adapter, phase].
    Rows left with no assistant token after truncation are dropped, as in ``tokenize_batch``.
    """
    tok = get_tokenizer(model_path)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "n_tokens", "split", "adapter",
                                            "phase", "error")}
    for messages, split, path in zip(batch["messages"], batch["split"], batch["path"]):
        adapter, phase = _unit(units, str(path))
        try:
            row = tokenize_chat(tok, list(messages), max_seq_len)
            error = ""
        except Exception as e:  # this culture's problem; the pack goes on without it
            row, error = {"input_ids": [], "labels": []}, f"{type(e).__name__}: {e}"
        if row is not None:
            append_token_row(out, row, split, adapter=adapter, phase=phase, error=error)
    cols = _as_columns(out)
    if not out["input_ids"]:  # keep the schema of an empty batch
        cols.update(input_ids=np.empty(0, dtype=object), labels=np.empty(0, dtype=object))
    return cols


def _unit(units: dict[str, list], path: str) -> tuple[str, int]:
    got = units.get(path) or units.get(path.lstrip("/")) or next(
        (v for k, v in units.items() if path.endswith(k.lstrip("/"))), None)
    if got is None:
        raise KeyError(f"partition {path} belongs to no adapter of this pack")
    return str(got[0]), int(got[1])


def build_pack_dataset(tc, model_path: str, store, members: dict[str, list]) -> tuple[object, dict[str, str]]:
    """The pack's token rows (train and validation of every member), materialized, and the errors.

    Args:
        members: adapter -> phases of (culture, tasks) partitions.
    Returns:
        (Ray Dataset with columns input_ids, labels, n_tokens, split, adapter, phase, error;
        {adapter: error} for the members dropped).
    """
    import pandas as pd
    import ray.data

    units, errors = {}, {}
    for name, phases in members.items():
        for i, phase in enumerate(phases):
            paths = [p for culture, tasks in phase for p in artifacts.synth_files(store, culture, tasks)]
            if not paths:
                errors[name] = f"ValueError: adapter {name}: no synth data in phase {i} ({phase})"
            units.update({p: [name, i] for p in paths})
    paths = [p for p, (name, _) in units.items() if name not in errors]
    if not paths:
        return None, errors
    kwargs = {"model_path": model_path, "max_seq_len": tc.max_seq_len, "units": units}
    local = synth_row_count(store, paths) <= tc.local_tokenize_rows
    if local:  # few rows: the same UDF in this process, no Ray Data tasks to start
        cols = tokenize_pack_batch(read_synth_batch(store, paths, with_path=True), **kwargs)
        stats = pd.DataFrame({k: cols[k] for k in ("adapter", "phase", "split", "error")})
    else:
        ds = ray.data.read_parquet(paths, filesystem=store.fs, columns=["messages", "split"],
                                   include_paths=True, partitioning=None,
                                   override_num_blocks=min(len(paths), 8))
        ds = ds.map_batches(tokenize_pack_batch, batch_format="numpy", batch_size=64, num_cpus=0.25,
                            fn_kwargs=kwargs).materialize()
        stats = ds.select_columns(["adapter", "phase", "split", "error"]).to_pandas()
    for name, phases in members.items():
        if name in errors:
            continue
        rows = stats[stats["adapter"] == name]
        bad = rows[rows["error"] != ""]
        if len(bad):
            errors[name] = f"{bad['error'].iloc[0]} ({len(bad)} of {len(rows)} rows failed to tokenize)"
            continue
        for i, phase in enumerate(phases):
            if not ((rows["phase"] == i) & (rows["split"] != "validation")).any():
                errors[name] = f"ValueError: adapter {name}: no usable training rows in phase {i} ({phase})"
                break
    keep = set(members) - set(errors)
    if local:
        return dataset_from_columns(cols, (stats["adapter"].isin(keep) & (stats["error"] == "")).to_numpy()), errors
    if not errors:
        return ds, errors
    return ds.filter(lambda r: r["adapter"] in keep and r["error"] == "").materialize(), errors
