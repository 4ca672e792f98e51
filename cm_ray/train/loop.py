"""The Train worker's step loop: phases of micro-batches streamed from ``ray.train.get_dataset_shard``,
optimizer steps, periodic checkpoints, resume at the same step and epoch position, the validation
loss, and the fault injection that the resume tests use.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from cm_ray.train.setup import WorkerSetup, optimizer_step, save_checkpoint


def steps_plan(phase_rows: list[tuple[str, int]], train_cfg, world: int) -> tuple[list[dict], int]:
    """Micro-batch boundaries per phase and the total optimizer steps.

    Args:
        phase_rows: (dataset name, rows) per phase, in training order.
    Returns:
        (phases with ``micro_per_epoch`` and cumulative ``end_micro``, total optimizer steps).
    """
    phases, end = [], 0
    budget = train_cfg.max_steps * train_cfg.grad_accum if train_cfg.max_steps else None
    for name, rows in phase_rows:
        per_worker = rows // world  # streaming_split(equal=True) gives every worker this many
        if per_worker == 0:
            raise ValueError(f"dataset {name}: {rows} rows for {world} workers")
        micro_per_epoch = math.ceil(per_worker / train_cfg.batch_size)
        n = max(train_cfg.grad_accum, math.ceil(train_cfg.epochs * micro_per_epoch))
        n -= n % train_cfg.grad_accum  # end each phase on an optimizer step
        if budget is not None:
            n = min(n, max(0, budget - end))
        end += n
        phases.append({"dataset": name, "rows": rows, "micro_per_epoch": micro_per_epoch, "end_micro": end})
    return phases, end // train_cfg.grad_accum


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over all workers (the values themselves without a process group)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def step_totals(loss: float, tokens: int, world: int) -> tuple[float, int]:
    """A step's loss and tokens over all workers: the mean of the workers' losses (the loss whose
    gradient the all-reduced step follows) and the sum of their tokens; one collective per step."""
    if world == 1:
        return loss, tokens
    loss_sum, tok_sum = all_sum([loss, tokens])
    return loss_sum / world, int(tok_sum)


def _maybe_crash(fault: dict | None, step: int) -> None:
    """Fault injection for resume tests: exit hard once at ``fault['at_step']`` (marker file)."""
    if fault and step == fault["at_step"] and not os.path.exists(fault["marker"]):
        Path(fault["marker"]).write_text(str(step))
        _wait_reports_taken()
        os._exit(1)


def _wait_reports_taken() -> None:
    """Until Ray Train's controller has taken this worker's reports: it polls workers every few
    seconds, and a checkpoint reported just before a hard exit would otherwise be lost at random,
    so the resume point the tests check would depend on timing."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().get_result_queue().join()
        time.sleep(1)  # the poll that took them still has to send its reply
    except (ImportError, AttributeError, RuntimeError):
        time.sleep(5)


def run_loop(ws: WorkerSetup, spec: dict, state: dict) -> tuple[float, int]:
    """Step through every phase from ``state`` to ``spec['total_steps']``; ``state`` is updated.

    Returns (steady-state seconds, steady-state tokens): the clock starts after the first
    optimizer step, so warm-up is excluded.
    """
    import ray.train

    from cm_ray.train.data import collate

    tc, engine = spec["train"], ws.engine
    phases, total_steps = spec["phases"], spec["total_steps"]
    accum = tc.grad_accum
    every = tc.checkpoint_every_steps or max(1, phases[0]["micro_per_epoch"] // accum)
    micro_loss, micro_tokens = 0.0, 0
    t_first = None
    steady_tokens = 0
    engine.train()
    for phase_i in range(state["phase"], len(phases)):
        phase = phases[phase_i]
        shard = ray.train.get_dataset_shard(phase["dataset"])
        while state["micro"] < phase["end_micro"]:
            batches = shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy",
                                         local_shuffle_buffer_size=tc.shuffle_buffer or None,
                                         local_shuffle_seed=spec["seed"] + state["epoch"])
            seen = 0
            for i, batch in enumerate(batches):
                seen += 1
                if i < state["in_epoch"]:
                    continue  # consumed before the restart
                if state["micro"] >= phase["end_micro"]:
                    break
                inputs = collate(batch, ws.tok.pad_token_id, ws.device)
                loss = engine(**inputs).loss
                if ws.zero_stage is not None:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / accum).backward()
                n_tok = int(inputs["attention_mask"].sum())
                micro_loss += float(loss.detach()) / accum
                micro_tokens += n_tok
                state["micro"] += 1
                state["in_epoch"] = i + 1
                if state["micro"] % accum:
                    continue
                if ws.zero_stage is None:
                    optimizer_step(ws, tc.max_grad_norm)
                state["step"] += 1
                if t_first is None:
                    t_first = time.perf_counter()
                else:
                    steady_tokens += micro_tokens  # this worker's (summed over workers at the end)
                step_loss, step_tokens = step_totals(micro_loss, micro_tokens, ws.world)
                state["tokens"] += step_tokens
                state["loss_curve"].append([state["step"], round(step_loss, 5)])
                micro_loss, micro_tokens = 0.0, 0
                if state["step"] % every == 0 and state["step"] < total_steps:
                    save_checkpoint(ws, state, {"step": state["step"], "loss": state["loss_curve"][-1][1],
                                                "epoch": state["epoch"]})
                _maybe_crash(spec.get("fault"), state["step"])
            else:
                if not seen:
                    raise RuntimeError(f"dataset {phase['dataset']}: this worker's shard is empty")
                state["epoch"] += 1
                state["in_epoch"] = 0
        state.update(phase=phase_i + 1, epoch=0, in_epoch=0)
    elapsed = (time.perf_counter() - t_first) if t_first else 0.0
    return elapsed, steady_tokens


def validation_loss(ws: WorkerSetup, batch_size: int) -> float | None:
    """Token-weighted mean loss on the validation shard, summed over all workers."""
    import ray.train
    import torch

    from cm_ray.train.data import IGNORE, collate

    engine = ws.engine
    engine.eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("validation").iter_batches(batch_size=batch_size,
                                                                             batch_format="numpy"):
            inputs = collate(batch, ws.tok.pad_token_id, ws.device)
            k = int((inputs["labels"][:, 1:] != IGNORE).sum())
            loss_sum += float(engine(**inputs).loss) * k
            n += k
    engine.train()
    loss_sum, n = all_sum([loss_sum, n])
    return round(loss_sum / n, 5) if n else None
