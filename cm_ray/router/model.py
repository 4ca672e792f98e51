"""The culture router's classifier: sentence embedding + linear head -> culture key or ``none``.

``train_router`` embeds (text, culture) pairs with the configured encoder (all-MiniLM-L6-v2 by
default), fits a multinomial logistic regression (label = culture), then calibrates it with
temperature scaling on the validation split. The artifact under ``router/`` is plain data, no
pickle: ``head.npz`` (weights, bias) + ``router.json`` (cultures, encoder, temperature, threshold)
+ ``metrics.json`` (validation accuracy, confusion, ECE), published together as one version
(``ArtifactStore.publish_dir``: readers see the old router or the new one, never a mix). The
``route`` stage that trains it on the synthetic inputs is ``cm_ray.router.stage``.

Inference (``load_router(store_or_dir).predict(texts, metadata)``) needs neither Ray nor sklearn.
A calibrated probability below ``router.threshold`` answers ``none``. Metadata, when
``router.use_metadata`` is on: a declared ``country`` that is one of the router's cultures wins
outright; a declared ``language`` down-weights cultures that do not speak it.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any

import numpy as np

from cm_ray.artifacts import NONE, published, router_dir

LANGUAGE_MISMATCH_WEIGHT = 0.2
"""Prior weight of a culture whose languages do not include the request's declared language."""


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Encoder:
    """Sentence encoder (sentence-transformers), loaded once, L2-normalised float32 embeddings."""

    def __init__(self, ref: str, cache_dir: str | None = None):
        from sentence_transformers import SentenceTransformer

        from cm_ray.models import resolve_model

        self.ref = ref
        self.model = SentenceTransformer(resolve_model(ref, cache_dir), device="cpu")

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class CultureRouter:
    """Calibrated culture classifier over sentence embeddings.

    Attributes:
        cultures: the culture keys the head was trained on (its classes, in order).
        threshold: calibrated probability below which ``predict`` answers ``none``.
    """

    def __init__(self, cultures: list[str], weight: np.ndarray, bias: np.ndarray,
                 temperature: float = 1.0, threshold: float = 0.4, encoder: Any = None,
                 encoder_ref: str = "embedded:all-minilm-l6-v2", use_metadata: bool = True):
        self.cultures = list(cultures)
        self.weight, self.bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        self.temperature, self.threshold = float(temperature), float(threshold)
        self.encoder_ref, self.use_metadata = encoder_ref, use_metadata
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(self.encoder_ref)
        return self._encoder

    def logits(self, emb: np.ndarray) -> np.ndarray:
        return emb @ self.weight.T + self.bias

    def probabilities(self, texts: list[str], metadata: list[dict] | None = None) -> np.ndarray:
        """Calibrated class probabilities, shape (len(texts), len(cultures))."""
        if len(self.cultures) == 1:  # one adapter: nothing to choose between
            return np.ones((len(texts), 1), np.float32)
        probs = _softmax(self.logits(self.encoder(texts)) / self.temperature)
        if self.use_metadata and metadata:
            probs = np.stack([self._apply_language(p, m or {}) for p, m in zip(probs, metadata)])
        return probs

    def _apply_language(self, p: np.ndarray, meta: dict) -> np.ndarray:
        lang = str(meta.get("language") or "").split("-")[0].split("_")[0].lower()
        if not lang:
            return p
        from cm_ray.cultures import get_culture

        w = np.array([1.0 if lang in get_culture(c).languages else LANGUAGE_MISMATCH_WEIGHT
                      for c in self.cultures])
        return p * w / (p * w).sum() if w.max() == 1.0 else p

    def predict(self, texts: list[str], metadata: list[dict] | None = None) -> list[tuple[str, float]]:
        """Culture key (or ``"none"``) and its calibrated probability, per text."""
        out: list[tuple[str, float]] = []
        declared = [self._declared(m) for m in (metadata or [{}] * len(texts))]
        probs = self.probabilities(texts, metadata)
        for d, p in zip(declared, probs):
            if d is not None:
                out.append((d, 1.0))
                continue
            i = int(np.argmax(p))
            conf = float(p[i])
            out.append((self.cultures[i] if conf >= self.threshold else NONE, round(conf, 4)))
        return out

    def _declared(self, meta: dict | None) -> str | None:
        """The culture a request declares through metadata ``country``, when the router knows it."""
        if not (self.use_metadata and meta and meta.get("country")):
            return None
        from cm_ray.cultures import normalize_culture

        try:
            key = normalize_culture(str(meta["country"]))
        except KeyError:
            return None
        return key if key in self.cultures else None

    # -- persistence (plain npz + json) -----------------------------------------------------
    def save(self, store, *parts: str, metrics: dict | None = None) -> str:
        """Publish head.npz + router.json (+ ``metrics``) as one new version of ``parts`` (one
        pointer switch: a crash never leaves half a router); returns the version id."""
        import json
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="router-") as d:
            np.savez(Path(d, "head.npz"), weight=self.weight, bias=self.bias)
            meta = {"cultures": self.cultures, "temperature": self.temperature,
                    "threshold": self.threshold, "encoder": self.encoder_ref,
                    "use_metadata": self.use_metadata, "dim": int(self.weight.shape[1]), "format": 1}
            Path(d, "router.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            if metrics is not None:
                Path(d, "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True,
                                                              default=str))
            return store.publish_dir(d, *parts)


def load_router(store_or_dir, encoder: Any = None, threshold: float | None = None) -> CultureRouter:
    """Load the router published under ``<store>/router/`` (or a plain directory holding it).

    Args:
        store_or_dir: an ArtifactStore (reads ``router/``), a local directory or an s3:// URI of
            the router directory itself (its current version, or router.json written in place).
        encoder: an already-loaded Encoder to share; None loads the one named in router.json.
        threshold: override the saved confidence threshold.
    """
    from cm_ray.storage import ArtifactStore

    if isinstance(store_or_dir, ArtifactStore):
        store, parts = store_or_dir, router_dir()
    else:
        store, parts = ArtifactStore(str(store_or_dir)), ()
    got = published(store, parts, "router.json")
    if got is None:
        raise FileNotFoundError(f"no router at {store.uri(*parts)}: run `cm-ray route CONFIG` first")
    parts = got[0]
    meta = store.read_json(*parts, "router.json")
    with np.load(io.BytesIO(store.read_bytes(*parts, "head.npz")), allow_pickle=False) as npz:
        weight, bias = npz["weight"], npz["bias"]
    return CultureRouter(meta["cultures"], weight, bias, meta["temperature"],
                         meta["threshold"] if threshold is None else threshold, encoder,
                         meta["encoder"], meta.get("use_metadata", True))


# -- training ---------------------------------------------------------------------------------


def fit_temperature(logits: np.ndarray, labels: np.ndarray, min_t: float = 0.25) -> float:
    """The temperature minimising validation NLL (a 1-D search over log T).

    T is kept >= ``min_t``: on a small, perfectly separated validation set the NLL keeps falling
    as T -> 0, which would turn every prediction into a certainty.
    """
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = _softmax(logits / math.exp(log_t))
        return float(-np.log(p[np.arange(len(labels)), labels] + 1e-12).mean())

    return float(math.exp(minimize_scalar(nll, bounds=(math.log(min_t), 3.0), method="bounded").x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    ece = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        m = (conf > lo) & (conf <= lo + 1.0 / bins)
        if m.any():
            ece += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return round(float(ece), 4)


def train_router(train: list[tuple[str, str]], validation: list[tuple[str, str]], encoder,
                 threshold: float = 0.4, use_metadata: bool = True, c: float = 10.0,
                 seed: int = 0) -> tuple[CultureRouter, dict]:
    """Fit the head on (text, culture) pairs, calibrate on validation; return (router, metrics).

    Validation pairs may be empty: a stratified fifth of the training pairs is held out then.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    note = None
    if not validation:
        counts = Counter(c for _, c in train)
        if min(counts.values()) >= 2 and int(len(train) * 0.2) >= len(counts):
            train, validation = train_test_split(train, test_size=0.2, random_state=seed,
                                                 stratify=[c for _, c in train])
        else:
            # Too few rows to hold one out per culture: calibrate and report in-sample, and say so.
            validation = list(train)
            note = "validation is in-sample: too few rows per culture to hold any out"
    cultures = sorted({c for _, c in train})
    index = {k: i for i, k in enumerate(cultures)}
    enc_ref = getattr(encoder, "ref", "embedded:all-minilm-l6-v2")
    if len(cultures) == 1:
        router = CultureRouter(cultures, np.zeros((1, 1)), np.zeros(1), 1.0, threshold, encoder,
                               enc_ref, use_metadata)
        return router, {"cultures": cultures, "n_train": len(train), "n_validation": len(validation),
                        "accuracy": 1.0, "note": "one culture: the router always picks it"}
    x_tr = encoder([t for t, _ in train])
    y_tr = np.array([index[c] for _, c in train])
    head = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_tr, y_tr)
    val = [(t, c) for t, c in validation if c in index]
    x_va, y_va = encoder([t for t, _ in val]), np.array([index[c] for _, c in val])
    weight, bias = head.coef_, head.intercept_
    if len(cultures) == 2:
        # Binary LogisticRegression keeps one row (logit of class 1); softmax over [0, z] is the
        # same sigmoid, so store it as two rows like the multi-class case.
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    router = CultureRouter(cultures, weight, bias, 1.0, threshold, encoder, enc_ref, use_metadata)
    logits = router.logits(x_va)
    router.temperature = fit_temperature(logits, y_va)
    probs = _softmax(logits / router.temperature)
    pred = probs.argmax(axis=1)
    routed = probs.max(axis=1) >= threshold
    labels = cultures + [NONE]
    confusion = {t: {p: 0 for p in labels} for t in cultures}
    for y, p, r in zip(y_va, pred, routed):
        confusion[cultures[y]][cultures[p] if r else NONE] += 1
    metrics = {
        "cultures": cultures, "n_train": len(train), "n_validation": len(val),
        "accuracy": round(float((pred == y_va).mean()), 4),
        "accuracy_at_threshold": round(float(((pred == y_va) & routed).mean()), 4),
        "coverage": round(float(routed.mean()), 4), "threshold": threshold,
        "temperature": round(router.temperature, 4),
        "ece_uncalibrated": expected_calibration_error(_softmax(logits), y_va),
        "ece": expected_calibration_error(probs, y_va), "confusion": confusion,
        "train_accuracy": round(float(head.score(x_tr, y_tr)), 4),
    }
    if note:
        metrics["note"] = note
    return router, metrics
