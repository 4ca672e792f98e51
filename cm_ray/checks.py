"""Degradations: where a stage did less than its config asked, counted per partition, named in the
stage summary and ``cm-ray status``, and a failure past its threshold.

A stage lists what it saw in ``summary["degradations"]``, one record per (kind, partition): how
many units of ``total`` were degraded and a short detail (``MX: 8 of 8 searches answered by the
fallback bm25``). ``over_threshold`` compares each record's fraction with ``checks.<kind>`` (the
largest fraction a run accepts; null: report only). ``run_stage`` records the partitions past their
threshold as failed (a rerun recomputes them) and, with ``checks.fail`` (the default), raises
``DegradedError`` naming the stage and the cultures. ``cm-ray rehearse`` reads the same records.

Pure Python: no Ray, no torch.
"""

from __future__ import annotations

KINDS = {
    "search_fallback": "searches answered by a fallback provider instead of the configured one",
    "search_failed": "searches that failed after retries and fallbacks",
    "llm_queries_rejected": "LLM-written queries rejected (only template queries remain)",
    "prompt_over_limit": "prompts longer than the model's context (rows rejected)",
    "unreadable": "models or files a worker could not open",
    "placement": "requests placed on a node type that does not offer their resources",
    "wrong_engine": "answers served by another engine than the config's",
}
"""Degradation kind -> what it counts (the threshold field of ``checks`` has the same name)."""


class DegradedError(RuntimeError):
    """A stage finished, but degraded past a threshold: the message names the stage, the cultures
    and each degradation with its threshold."""

    def __init__(self, stage: str, over: list[dict]):
        self.stage, self.over = stage, over
        cultures = sorted({d["culture"] for d in over})
        super().__init__(f"{stage}: degraded past its thresholds for {', '.join(cultures)}: "
                         + "; ".join(describe(d) for d in over)
                         + " (checks.<kind> sets each threshold; checks.fail=false only reports)")


def degradation(kind: str, key: str, bad: int, total: int, detail: str = "") -> dict:
    """One record for ``summary["degradations"]``: ``bad`` of ``total`` units of partition ``key``
    (``MX`` or ``MX/offensive``) were degraded in the way ``kind`` names."""
    if kind not in KINDS:
        raise KeyError(f"unknown degradation kind {kind!r} (known: {', '.join(KINDS)})")
    return {"kind": kind, "key": key, "culture": key.split("/")[0], "bad": int(bad), "total": int(total),
            "fraction": round(bad / total, 4) if total else 1.0, "detail": detail}


def describe(d: dict) -> str:
    """``MX search_fallback 8/8 (> 0.5): 8 of 8 searches answered by the fallback bm25``."""
    limit = f" (> {d['threshold']:g})" if d.get("threshold") is not None else ""
    return f"{d['key']} {d['kind']} {d['bad']}/{d['total']}{limit}" + (f": {d['detail']}" if d.get("detail") else "")


def over_threshold(checks, records: list[dict]) -> list[dict]:
    """The records whose fraction exceeds their kind's threshold in ``checks`` (a ChecksConfig),
    each with the threshold added."""
    out = []
    for d in records or []:
        limit = getattr(checks, d["kind"], None)
        if limit is not None and d["bad"] > 0 and d["fraction"] > limit:
            out.append({**d, "threshold": limit})
    return out


def failed_reasons(over: list[dict]) -> dict[str, str]:
    """``{partition key: reason}`` for ``fingerprints.finish``: a degraded partition is failed."""
    reasons: dict[str, list[str]] = {}
    for d in over:
        reasons.setdefault(d["key"], []).append(f"degraded: {d['kind']} {d['bad']}/{d['total']} > {d['threshold']:g}")
    return {k: "; ".join(v) for k, v in reasons.items()}


def by_key(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by partition key (what ``cm-ray status`` shows in a cell)."""
    out: dict[str, list[dict]] = {}
    for d in records or []:
        out.setdefault(d["key"], []).append(d)
    return out
