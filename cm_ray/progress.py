"""Readable progress on long stages: one updating line per stage (tqdm) — partitions or cultures
done / total, rows so far, elapsed and ETA — and a Tune callback that prints each culture's trial
as it finishes."""

from __future__ import annotations

import sys
from typing import Any


def stage_bar(stage: str, total: int, unit: str = "culture"):
    """A tqdm bar on stderr for ``total`` units of ``stage`` (``bar.set_postfix(rows=...)``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
                disable=total == 0, bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s{postfix} "
                                               "[{elapsed} elapsed, ETA {remaining}]")


def trial_line(params: dict, metrics: dict | None, error: Any, done: int, total: int) -> str:
    """``train 2/5 GB: loss 2.10 -> 1.32, 40 steps`` (or ``failed: ...``) for one finished trial."""
    unit = params.get("unit") or {}
    name = params.get("adapter") or unit.get("adapter") or ",".join(unit.get("adapters") or []) or "?"
    m = metrics or {}
    if error is not None:
        what = f"failed: {str(error).strip().splitlines()[-1][:160] if str(error).strip() else type(error).__name__}"
    elif m.get("loss") is not None:
        what = f"loss {m['loss']:.3f} at step {m.get('step')}"
    else:
        what = "finished"
    return f"train {done}/{total} {name}: {what}"


def trial_callback(total: int):
    """A ``ray.tune.Callback`` printing ``trial_line`` for every trial as it completes or errors."""
    from ray.tune import Callback

    class _Trials(Callback):
        def __init__(self):
            self.done = 0

        def _print(self, trial, error=None):
            self.done += 1
            print(trial_line(trial.config, trial.last_result, error, self.done, total), file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._print(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._print(trial, getattr(trial, "error_msg", None) or "error")

    return _Trials()
