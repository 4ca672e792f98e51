"""A pack worker's data and step loop: every adapter's rows in memory, one optimizer step per
adapter per round, each adapter activated (PEFT ``set_adapter``) for its own micro-batches.

An adapter's micro-batches, optimizer, LR schedule and clipping depend on its own data and state
only, so with the same data order and seed it gets the same weights in a pack as alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cm_ray.train.data import pack_rows
from cm_ray.train.loop import step_totals
from cm_ray.train.setup import WorkerSetup, optimizer_step


@dataclass
class Slot:
    """One adapter of the pack on this worker."""

    name: str
    phases: list[dict]
    """``steps_plan`` phases: rows, micro_per_epoch, cumulative end_micro."""
    total_steps: int
    train: list[list[dict]]
    """Per phase, this worker's share of the training rows, in data order."""
    val: list[dict]
    ws: WorkerSetup | None = None
    """This adapter's view of the worker: its engine (or the model), optimizer, schedule, params."""
    state: dict = field(default_factory=lambda: {
        "step": 0, "micro": 0, "phase": 0, "epoch": 0, "in_epoch": 0, "loss_curve": [], "tokens": 0,
        "resumed_from": [], "steady_seconds": 0.0, "steady_tokens": 0})


def read_pack_rows(shard, adapters: list[str], packing: bool, max_seq_len: int) -> dict[str, dict]:
    """Every adapter's rows from the (unsplit) pack dataset, in data order, per phase and split:
    ``{adapter: {phase: {"train": [row], "validation": [row]}}}``; rows are packed per adapter
    and phase when ``packing`` (as ``pack_rows`` over 256-row batches in the one-adapter path)."""
    streams: dict[str, dict[int, list]] = {a: {} for a in adapters}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for ids, labels, split, adapter, phase in zip(batch["input_ids"], batch["labels"], batch["split"],
                                                      batch["adapter"], batch["phase"]):
            if str(adapter) in streams:
                streams[str(adapter)].setdefault(int(phase), []).append((ids, labels, str(split)))
    out: dict[str, dict] = {}
    for a, phases in streams.items():
        out[a] = {}
        for p, rows in phases.items():
            if packing:
                packed = []
                for k in range(0, len(rows), 256):
                    chunk = rows[k:k + 256]
                    cols = pack_rows({"input_ids": [r[0] for r in chunk], "labels": [r[1] for r in chunk],
                                      "split": [r[2] for r in chunk]}, max_seq_len)
                    packed += [({"input_ids": i, "labels": lab, "position_ids": pos}, s) for i, lab, pos, s
                               in zip(cols["input_ids"], cols["labels"], cols["position_ids"], cols["split"])]
            else:
                packed = [({"input_ids": i, "labels": lab}, s) for i, lab, s in rows]
            out[a][p] = {"train": [r for r, s in packed if s != "validation"],
                         "validation": [r for r, s in packed if s == "validation"]}
    return out


def worker_share(rows: list, rank: int, world: int) -> list:
    """This worker's equal share (every world-th row; the remainder is left out on every worker)."""
    return rows[rank::world][: len(rows) // world]


def _batch(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def _epoch_order(n: int, seed: int, phase: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, phase, epoch]).permutation(n)


def adapter_step(slot: Slot, tc, seed: int, tok: Any) -> None:
    """One optimizer step of ``slot`` (``grad_accum`` micro-batches), its adapter already active."""
    from cm_ray.train.data import collate

    ws, st, accum = slot.ws, slot.state, tc.grad_accum
    t0 = time.perf_counter()
    step_loss, step_tokens = 0.0, 0
    while True:
        phase = slot.phases[st["phase"]]
        rows = slot.train[st["phase"]]
        n_batches = phase["micro_per_epoch"]
        order = _epoch_order(len(rows), seed, st["phase"], st["epoch"], tc.shuffle_buffer > 0)
        i = st["in_epoch"]
        batch = [rows[j] for j in order[i * tc.batch_size:(i + 1) * tc.batch_size]]
        inputs = collate(_batch(batch), tok.pad_token_id, ws.device)
        loss = ws.engine(**inputs).loss
        if ws.zero_stage is not None:
            ws.engine.backward(loss)
            ws.engine.step()
        else:
            (loss / accum).backward()
        step_loss += float(loss.detach()) / accum
        step_tokens += int(inputs["attention_mask"].sum())
        st["micro"] += 1
        st["in_epoch"] = i + 1
        if st["in_epoch"] >= n_batches:
            st.update(epoch=st["epoch"] + 1, in_epoch=0)
        if st["micro"] >= phase["end_micro"]:
            st.update(phase=st["phase"] + 1, epoch=0, in_epoch=0)
        if st["micro"] % accum == 0:
            break
    if ws.zero_stage is None:
        if ws.world > 1:  # the mean DDP takes, over this adapter's gradients only
            import torch.distributed as dist

            for p in ws.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(ws.world)
        optimizer_step(ws, tc.max_grad_norm)
    st["step"] += 1
    if st["step"] > 1:  # steady state: the adapter's first step is excluded, as in the one-adapter loop
        st["steady_seconds"] += time.perf_counter() - t0
        st["steady_tokens"] += step_tokens  # this worker's (summed over workers at the end)
    step_loss, step_tokens = step_totals(step_loss, step_tokens, ws.world)
    st["tokens"] += step_tokens
    st["loss_curve"].append([st["step"], round(step_loss, 5)])


def validation_loss(slot: Slot, batch_size: int, tok: Any) -> float | None:
    """Token-weighted mean loss of the slot's validation rows, summed over all workers."""
    import torch

    from cm_ray.train.data import IGNORE, collate
    from cm_ray.train.loop import all_sum

    ws = slot.ws
    ws.engine.eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(slot.val), batch_size):
            inputs = collate(_batch(slot.val[k:k + batch_size]), tok.pad_token_id, ws.device)
            m = int((inputs["labels"][:, 1:] != IGNORE).sum())
            loss_sum += float(ws.engine(**inputs).loss) * m
            n += m
    ws.engine.train()
    loss_sum, n = all_sum([loss_sum, n])
    return round(loss_sum / n, 5) if n else None
