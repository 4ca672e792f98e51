"""The Ray Train worker: LoRA SFT of one adapter with DeepSpeed (or DDP), resumable from checkpoints.

``train_fn_per_worker(spec)`` runs on every worker of a ``TorchTrainer``: setup (``train.setup``:
model + PEFT + engine), restore from the last checkpoint after a failure (same step, same epoch
position), the step loop (``train.loop``), then rank 0 writes the PEFT adapter and ``metrics.json``
to ``adapters/<name>/`` in the store (``train.save``).

``spec`` (the ``train_loop_config``) holds only what the worker needs: ``train`` (the TrainConfig
section, preset applied), ``seed``, ``model_ref``, ``cache_dir``, ``root``, ``adapter``, ``phases``,
``total_steps``, ``rows``, ``has_validation``, ``run_name`` and ``fault`` (test hook).
"""

from __future__ import annotations


def train_fn_per_worker(spec: dict) -> None:
    import ray.train

    from cm_ray.train.loop import all_sum, run_loop, validation_loss
    from cm_ray.train.save import adapter_metrics, gather_lora, probe_logits, publish_adapter
    from cm_ray.train.setup import new_state, restore_state, setup_worker

    tc = spec["train"]
    ws = setup_worker(spec)
    state = new_state()
    restore_state(ws, state)
    elapsed, steady_tokens = run_loop(ws, spec, state)

    # Collectives below run on every rank, in this order.
    val_loss = validation_loss(ws, tc.batch_size) if spec["has_validation"] else None
    probe = probe_logits(ws)
    steady_tok, secs = all_sum([steady_tokens, elapsed])
    tokens_per_s = steady_tok / (secs / ws.world) if secs > 0 else None
    lora_sd = gather_lora(ws)

    report = {"step": state["step"], "loss": state["loss_curve"][-1][1] if state["loss_curve"] else None,
              "val_loss": val_loss, "tokens_per_s": tokens_per_s}
    if ws.rank != 0:
        ray.train.report(report)
        return
    metrics = adapter_metrics(ws, spec, state, report, probe, secs / ws.world)
    publish_adapter(ws, spec, metrics, report, lora_sd)
