"""Post-processing filters for generated text: deduplication, label balance, culture relevance.

Each filter takes rows and returns ``(kept, dropped)`` with a reason per dropped row, so every row
that leaves the pipeline is counted (``FilterLog``). Nothing here imports torch at module level; the
relevance scorer loads its encoder inside its Ray UDF.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lower case, words only, single spaces (what exact-duplicate checks compare)."""
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, k: int = 3) -> set[str]:
    """Word k-grams of ``text``; texts shorter than k words give one shingle (the whole text)."""
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


class FilterLog:
    """The one drop log: rows in / out and drop reasons per step, in the order the steps ran.

    Used by the queries and synthesis stages and by the recipes. ``to_dict`` gives the per-step
    view (synthesis stats), ``drop_counts`` the flat ``{"step:reason": n}`` view (recipe
    summaries) and ``reasons`` the reasons summed over steps (query rejections).
    """

    def __init__(self):
        self.steps: dict[str, dict] = {}

    def record(self, step: str, n_in: int, dropped: Iterable[str]) -> None:
        """``n_in`` rows entered ``step``; one reason per row it dropped."""
        reasons = Counter(dropped)
        entry = self.steps.setdefault(step, {"in": 0, "out": 0, "dropped": {}})
        entry["in"] += n_in
        entry["out"] += n_in - sum(reasons.values())
        for r, c in reasons.items():
            entry["dropped"][r] = entry["dropped"].get(r, 0) + c

    def to_dict(self) -> dict:
        return {k: {**v, "dropped": dict(sorted(v["dropped"].items()))} for k, v in self.steps.items()}

    def drop_counts(self) -> dict[str, int]:
        """Dropped rows as ``{"step:reason": n}``, sorted by key."""
        return dict(sorted((f"{step}:{r}", n) for step, e in self.steps.items()
                           for r, n in e["dropped"].items() if n > 0))

    def reasons(self) -> dict[str, int]:
        """Dropped rows per reason, summed over every step."""
        out: Counter = Counter()
        for e in self.steps.values():
            out.update(e["dropped"])
        return dict(+out)

    @staticmethod
    def merge(logs: Iterable[dict]) -> dict:
        """Sum several ``to_dict()`` outputs (e.g. all tasks of one culture)."""
        out: dict[str, dict] = {}
        for log in logs:
            for step, e in log.items():
                m = out.setdefault(step, {"in": 0, "out": 0, "dropped": {}})
                m["in"] += e["in"]
                m["out"] += e["out"]
                for r, c in e["dropped"].items():
                    m["dropped"][r] = m["dropped"].get(r, 0) + c
        return out


def dedup(rows: list[dict], text: Callable[[dict], str], threshold: float, *, k: int = 3,
          seen: Iterable[str] = (), use_minhash: bool | None = None) -> tuple[list[dict], list[str]]:
    """Drop exact and near duplicates, keeping the first occurrence.

    Exact = same ``normalize_text``; near = word k-gram Jaccard >= ``threshold`` (exact pairwise for
    small inputs, MinHash LSH from datasketch above a few hundred rows). ``seen`` texts (e.g. the
    task's seed examples) count as already kept, so copies of them are dropped as ``copies_seed``.

    Returns:
        (kept rows, one reason per dropped row: "duplicate", "near_duplicate" or "copies_seed").
    """
    seen = list(seen)
    if use_minhash is None:
        use_minhash = len(rows) + len(seen) > 300
    exact: dict[str, str] = {normalize_text(s): "copies_seed" for s in seen}
    kept_sh: list[tuple[set[str], str]] = [(shingles(s, k), "copies_seed") for s in seen]
    lsh = None
    if use_minhash:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=64)
        def mh(sh):
            m = MinHash(num_perm=64, seed=1)
            for s in sh:
                m.update(s.encode())
            return m
        for i, (sh, _) in enumerate(kept_sh):
            lsh.insert(f"s{i}", mh(sh))
    kept, reasons = [], []
    for row in rows:
        t = text(row)
        norm = normalize_text(t)
        if norm in exact:
            reasons.append("copies_seed" if exact[norm] == "copies_seed" else "duplicate")
            continue
        sh = shingles(t, k)
        if lsh is not None:
            m = mh(sh)
            hits = lsh.query(m)
            hit = ("copies_seed" if any(h.startswith("s") for h in hits) else "near_duplicate") if hits else None
        else:
            hit = next((why if why == "copies_seed" else "near_duplicate"
                        for prev, why in kept_sh if jaccard(sh, prev) >= threshold), None)
        if hit:
            reasons.append(hit)
            continue
        exact[norm] = "kept"
        if lsh is not None:
            lsh.insert(f"k{len(kept)}", m)
        else:
            kept_sh.append((sh, "kept"))
        kept.append(row)
    return kept, reasons


def balance_labels(rows: list[dict], ratio: float, key: str = "label") -> tuple[list[dict], list[str]]:
    """Cap every label at ``ceil(ratio * count of the second most frequent label)`` (at least 1).

    Rows without a label are kept. Which rows of an over-represented label survive is decided by
    their ``id`` (deterministic, independent of generation order).
    """
    counts = Counter(r[key] for r in rows if r.get(key) is not None)
    if not counts:
        return rows, []
    ordered = counts.most_common()
    second = ordered[1][1] if len(ordered) > 1 else 0
    cap = max(1, math.ceil(ratio * max(second, 1)))
    keep_ids: set[str] = set()
    for label in counts:
        ids = sorted(r["id"] for r in rows if r.get(key) == label)
        keep_ids.update(ids[:cap])
    kept = [r for r in rows if r.get(key) is None or r["id"] in keep_ids]
    return kept, ["label_balance"] * (len(rows) - len(kept))


def threshold_filter(rows: list[dict], key: str, threshold: float,
                     reason: str = "low_relevance") -> tuple[list[dict], list[str]]:
    """Keep rows whose ``key`` score is >= ``threshold`` (rows without a score are kept)."""
    kept = [r for r in rows if r.get(key) is None or r[key] >= threshold]
    return kept, [reason] * (len(rows) - len(kept))


class RelevanceScorer:
    """Ray Data UDF: cosine similarity between a sample and its culture's reference texts.

    The score is the best match among the snippets the sample was grounded in and a one-line
    description of the culture, embedded with the configured sentence encoder (MiniLM by default).

    Input columns:  sample_text (str), reference_texts (list[str]), status (str)
    Output columns: relevance (float; NaN where status is not "ok")
    """

    def __init__(self, encoder: str, cache_dir: str | None = None):
        from sentence_transformers import SentenceTransformer

        from cm_ray.models import resolve_model

        self.model = SentenceTransformer(resolve_model(encoder, cache_dir), device="cpu")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        ok = [i for i, s in enumerate(batch["status"]) if s == "ok"]
        scores = np.full(len(batch["status"]), np.nan, dtype="float64")
        if ok:
            texts = [str(batch["sample_text"][i]) for i in ok]
            refs = [[str(t) for t in batch["reference_texts"][i]] for i in ok]
            flat = [t for r in refs for t in r]
            emb = self.model.encode(texts + flat, batch_size=64, normalize_embeddings=True,
                                    convert_to_numpy=True)
            s_emb, r_emb = emb[:len(texts)], emb[len(texts):]
            pos = 0
            for j, i in enumerate(ok):
                n = len(refs[j])
                sims = r_emb[pos:pos + n] @ s_emb[j] if n else np.zeros(1)
                scores[i] = float(sims.max())
                pos += n
        return {**batch, "relevance": scores}
