"""The culture router: language evidence + country mentions + a content classifier -> culture key
or ``none``, with calibrated probabilities.

Scores per culture are summed in log space (``router.evidence``): ``language`` (py3langid's
P(language | text) folded with the culture's CLDR language population shares), ``mention`` (the
text names the country) — both need no training rows, so every configured culture is routable —
and ``content``: a multinomial logistic regression over sentence embeddings (all-MiniLM-L6-v2 by
default) of the synthetic inputs, for the cultures that have rows (log(K * p), 0 for the others).
The head's temperature is fitted on the validation split. The encoder is skipped for a
text whose other evidence alone already gives >= ``skip_content_at``, or where the head could only
put a culture it knows above one it never saw rows of (``evidence.content_applies``); embeddings
are cached per text.
``route`` says which evidence decided each pick (the term with the largest share of the winner's
margin over the runner-up). The artifact under ``router/`` is plain data, no pickle: ``head.npz``
(weights, bias) + ``router.json`` + ``metrics.json``, published together as one version.

Inference (``load_router(store_or_dir).predict(texts, metadata)``) needs neither Ray nor sklearn.
A calibrated probability below ``router.threshold`` answers ``none``. Metadata, when
``router.use_metadata`` is on: a declared ``country`` that is one of the router's cultures wins
outright; a declared ``language`` adds log share(language | culture) (evidence ``metadata``).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any

import numpy as np

from cm_ray.artifacts import NONE, published, router_dir
from cm_ray.router.encoder import Encoder
from cm_ray.router.metrics import routing_metrics

EVIDENCE = ("language", "mention", "variety", "content")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class CultureRouter:
    """Calibrated culture classifier (see the module docstring).

    Attributes:
        cultures: every culture it routes to, in order (rows or not).
        content_cultures: the cultures the content head was trained on (its classes, in order).
        threshold: calibrated probability below which ``predict`` answers ``none``.
    """

    def __init__(self, cultures: list[str], weight: np.ndarray, bias: np.ndarray,
                 temperature: float = 1.0, threshold: float = 0.4, encoder: Any = None,
                 encoder_ref: str = "embedded:all-minilm-l6-v2", use_metadata: bool = True,
                 content_cultures: list[str] | None = None, evidence: tuple[str, ...] = ("content",),
                 skip_content_at: float = 0.99, content_temperature: float | None = None,
                 encoder_int8: bool = False):
        self.cultures = list(cultures)
        self.content_cultures = list(self.cultures if content_cultures is None else content_cultures)
        self.weight, self.bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        self.temperature, self.threshold = float(temperature), float(threshold)
        self.encoder_ref, self.use_metadata = encoder_ref, use_metadata
        self.evidence, self.skip_content_at = tuple(evidence), float(skip_content_at)
        # The head's own calibration (format-1 routers had only the content term: one temperature).
        self.content_temperature = float(temperature if content_temperature is None else content_temperature)
        self.encoder_int8 = bool(getattr(encoder, "int8", encoder_int8))
        self._encoder = encoder
        self._emb_cache: dict[str, np.ndarray] = {}

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(self.encoder_ref, int8=self.encoder_int8)
        return self._encoder

    def warm(self) -> None:
        """Load everything a first request would otherwise load (the language-ID model, the
        mention and variety patterns through one scoring; the encoder and its first call, which
        that scoring may skip), so no request pays for it."""
        self.scores(["warm-up"])
        if "content" in self.evidence and len(self.content_cultures) > 1:
            self.encoder(["warm-up"])

    def logits(self, emb: np.ndarray) -> np.ndarray:
        return emb @ self.weight.T + self.bias

    def _embed(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._emb_cache))
        if todo:
            if len(self._emb_cache) > 50_000:
                self._emb_cache.clear()
            self._emb_cache.update(zip(todo, self.encoder(todo)))
        return np.stack([self._emb_cache[t] for t in texts])

    def scores(self, texts: list[str], metadata: list[dict] | None = None) -> dict[str, np.ndarray]:
        """Log-scores per evidence, each shape (len(texts), len(cultures)), before the temperature."""
        from cm_ray.router import evidence as E

        n, k = len(texts), len(self.cultures)
        out: dict[str, np.ndarray] = {}
        if "language" in self.evidence:
            out["language"] = E.language_scores(texts, self.cultures)
        if "mention" in self.evidence:
            out["mention"] = E.mention_scores(texts, self.cultures)
        if "variety" in self.evidence:
            out["variety"] = E.variety_scores(texts, self.cultures)
        if self.use_metadata and metadata and any((m or {}).get("language") for m in metadata):
            out["metadata"] = np.stack([E.declared_language_scores((m or {}).get("language"), self.cultures)
                                        for m in metadata])
        if "content" in self.evidence and len(self.content_cultures) > 1:
            content = np.zeros((n, k))
            cols = [self.cultures.index(c) for c in self.content_cultures]
            pre = sum(out.values()) if out else np.zeros((n, k))
            need = np.ones(n, bool) if not out or self.skip_content_at >= 1.0 else \
                (_softmax(pre / self.temperature).max(axis=1) < self.skip_content_at) & \
                E.content_applies(pre, cols)
            if need.any():
                idx = np.flatnonzero(need)
                p = _softmax(self.logits(self._embed([texts[i] for i in idx])) / self.content_temperature)
                content[np.ix_(idx, cols)] = np.log(np.maximum(p, E.CONTENT_FLOOR) * len(cols))
            out["content"] = content
        return out

    def _total(self, texts: list[str], metadata: list[dict] | None) -> tuple[np.ndarray, dict]:
        parts = self.scores(texts, metadata)
        total = sum(parts.values()) if parts else np.zeros((len(texts), len(self.cultures)))
        return total / self.temperature, parts

    def probabilities(self, texts: list[str], metadata: list[dict] | None = None) -> np.ndarray:
        """Calibrated probabilities, shape (len(texts), len(cultures))."""
        if len(self.cultures) == 1:  # one culture: nothing to choose between
            return np.ones((len(texts), 1), np.float32)
        return _softmax(self._total(texts, metadata)[0])

    def route(self, texts: list[str], metadata: list[dict] | None = None) -> list[dict]:
        """Per text: ``{culture, probability, evidence}``; culture is ``none`` below the threshold;
        evidence names what decided (``metadata_country``, ``language``, ``mention``, ``content``,
        ``metadata``, or ``only_culture``)."""
        declared = [self._declared(m) for m in (metadata or [{}] * len(texts))]
        if len(self.cultures) == 1:
            return [{"culture": d or self.cultures[0], "probability": 1.0,
                     "evidence": "metadata_country" if d else "only_culture"} for d in declared]
        z, parts = self._total(texts, metadata)
        probs = _softmax(z)
        out = []
        for i, (d, p) in enumerate(zip(declared, probs)):
            if d is not None:
                out.append({"culture": d, "probability": 1.0, "evidence": "metadata_country"})
                continue
            first, second = np.argsort(-p)[:2]
            why = max(parts, key=lambda e: parts[e][i, first] - parts[e][i, second]) if parts else NONE
            conf = float(p[first])
            out.append({"culture": self.cultures[first] if conf >= self.threshold else NONE,
                        "probability": round(conf, 4), "evidence": why})
        return out

    def predict(self, texts: list[str], metadata: list[dict] | None = None) -> list[tuple[str, float]]:
        """Culture key (or ``"none"``) and its calibrated probability, per text."""
        return [(r["culture"], r["probability"]) for r in self.route(texts, metadata)]

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
                    "use_metadata": self.use_metadata, "dim": int(self.weight.shape[1]), "format": 2,
                    "content_cultures": self.content_cultures, "evidence": list(self.evidence),
                    "skip_content_at": self.skip_content_at,
                    "content_temperature": self.content_temperature,
                    "encoder_int8": self.encoder_int8}
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
    int8 = meta.get("encoder_int8", False)
    if getattr(encoder, "int8", int8) != int8:  # the head only fits the embeddings it was fitted on
        raise ValueError(f"router at {store.uri(*parts)} was fitted with encoder_int8={int8}; "
                         f"the encoder given has int8={encoder.int8}")
    return CultureRouter(meta["cultures"], weight, bias, meta["temperature"],
                         meta["threshold"] if threshold is None else threshold, encoder,
                         meta["encoder"], meta.get("use_metadata", True), meta.get("content_cultures"),
                         tuple(meta.get("evidence", ["content"])), meta.get("skip_content_at", 0.99),
                         meta.get("content_temperature"), int8)


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


def train_router(train: list[tuple[str, str]], validation: list[tuple[str, str]], encoder,
                 threshold: float = 0.4, use_metadata: bool = True, c: float = 10.0,
                 seed: int = 0, cultures: list[str] | None = None,
                 evidence: tuple[str, ...] = EVIDENCE, skip_content_at: float = 0.99
                 ) -> tuple[CultureRouter, dict]:
    """Fit the content head on (text, culture) pairs, calibrate on validation; (router, metrics).

    ``cultures``: every culture to route to; one without rows is routed on language and mention
    evidence alone. Validation pairs may be empty: a stratified fifth of the training pairs is
    held out then.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    note = None
    if not validation and train:
        counts = Counter(c for _, c in train)
        if min(counts.values()) >= 2 and int(len(train) * 0.2) >= len(counts):
            train, validation = train_test_split(train, test_size=0.2, random_state=seed,
                                                 stratify=[c for _, c in train])
        else:
            # Too few rows to hold one out per culture: calibrate and report in-sample, and say so.
            validation = list(train)
            note = "validation is in-sample: too few rows per culture to hold any out"
    with_rows = sorted({c for _, c in train})
    every = sorted(set(with_rows) | set(cultures or []))
    enc_ref = getattr(encoder, "ref", "embedded:all-minilm-l6-v2")
    zero = [c for c in every if c not in with_rows]
    base = {"cultures": every, "zero_row_cultures": zero, "evidence": list(evidence),
            "n_train": len(train), "n_validation": len(validation)}
    if len(every) == 1:
        router = CultureRouter(every, np.zeros((1, 1)), np.zeros(1), 1.0, threshold, encoder,
                               enc_ref, use_metadata, with_rows, evidence, skip_content_at)
        return router, {**base, "accuracy": 1.0, "note": "one culture: the router always picks it"}
    index = {k: i for i, k in enumerate(with_rows)}
    weight, bias, train_acc = np.zeros((len(with_rows), 1)), np.zeros(len(with_rows)), None
    if "content" in evidence and len(with_rows) > 1:
        x_tr = encoder([t for t, _ in train])
        y_tr = np.array([index[c] for _, c in train])
        head = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_tr, y_tr)
        weight, bias = head.coef_, head.intercept_
        train_acc = round(float(head.score(x_tr, y_tr)), 4)
        if len(with_rows) == 2:
            # Binary LogisticRegression keeps one row (logit of class 1); softmax over [0, z] is
            # the same sigmoid, so store it as two rows like the multi-class case.
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    router = CultureRouter(every, weight, bias, 1.0, threshold, encoder, enc_ref, use_metadata,
                           with_rows, evidence, skip_content_at)
    val = [(t, c) for t, c in validation if c in every]
    texts, y_va = [t for t, _ in val], np.array([every.index(c) for _, c in val], int)
    if val and train_acc is not None:  # the head first, on the rows of its own cultures
        own = [i for i, (_, c) in enumerate(val) if c in index]
        router.content_temperature = fit_temperature(
            router.logits(encoder([texts[i] for i in own])), np.array([index[val[i][1]] for i in own]))
    # The sum is not re-fitted: each term is a calibrated log-probability already (langid's
    # posterior x CLDR shares; the head's temperature), and the synthetic rows are English for
    # every culture, so a temperature fitted on them would mis-calibrate requests in a culture's
    # own language (ECE on real text: bench/router.py).
    metrics = {**base, "n_validation": len(val), "train_accuracy": train_acc,
               **routing_metrics(router, texts, y_va), "temperature": round(router.temperature, 4),
               "content_temperature": round(router.content_temperature, 4)}
    if note:
        metrics["note"] = note
    return router, metrics
