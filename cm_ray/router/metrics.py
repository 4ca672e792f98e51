"""Routing quality on labelled texts: top-1 accuracy, accuracy at the threshold, coverage, ECE,
the confusion matrix and which evidence decided (used on validation rows and on real text)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from cm_ray.artifacts import NONE


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    ece = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        m = (conf > lo) & (conf <= lo + 1.0 / bins)
        if m.any():
            ece += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return round(float(ece), 4)


def routing_metrics(router: Any, texts: list[str], labels: np.ndarray,
                    metadata: list[dict] | None = None) -> dict:
    """Accuracy (top-1 and at the threshold), coverage, ECE, confusion and the deciding evidence
    of ``router`` on ``texts`` with true culture indices ``labels`` (into ``router.cultures``)."""
    if not texts:
        return {"accuracy": None, "ece": None, "confusion": {}}
    probs = router.probabilities(texts, metadata)
    routes = router.route(texts, metadata)
    pred = probs.argmax(axis=1)
    routed = probs.max(axis=1) >= router.threshold
    cultures = router.cultures
    confusion = {t: {p: 0 for p in [*cultures, NONE]} for t in cultures}
    for y, r in zip(labels, routes):
        if y >= 0:  # a label outside the router's cultures counts as wrong, has no row
            confusion[cultures[y]][r["culture"]] += 1
    return {"accuracy": round(float((pred == labels).mean()), 4),
            "accuracy_at_threshold": round(float(((pred == labels) & routed).mean()), 4),
            "coverage": round(float(routed.mean()), 4), "threshold": router.threshold,
            "ece": expected_calibration_error(probs, labels), "confusion": confusion,
            "decided_by": dict(Counter(r["evidence"] for r in routes))}
