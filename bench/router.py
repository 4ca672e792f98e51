"""Culture router on REAL text: accuracy, calibration and latency, against the language-ID-only
baseline in the same run.

Items: every culture with real culture-marked text under ../shared/data (BLEnD local-language
questions; culture_tasks sets from one country: MX, ES, DE, CN), ``--per-source`` texts per
culture and source. ``top1`` pools the texts (ES has three sources, GB one); ``top1_balanced`` is
the mean of the per-culture recalls (sklearn's balanced accuracy). The content head is trained on the shipped corpus (GB, CN, MX: English
texts), so the other cultures have zero training rows and are routed on language + mention alone.
Systems, side by side on the same texts:

- ``language_only``: py3langid + CLDR language shares (the baseline);
- ``language_mention``: + country mentions;
- ``language_mention_variety``: + regional-variety words (``cm_ray/router/varieties.yaml``);
- ``router``: + the MiniLM content head: the shipped default (int8 encoder, skipped where the
  other evidence decides);
- ``router_always_encode``: the same with the int8 encoder on every text;
- ``router_fp32_always_encode``: fp32 encoder on every text (the latency baseline: the router
  before the int8 encoder and the skip);
- ``rows_for_all`` / ``rows_for_all_fp32``: a run's router where every culture has rows (GB, CN,
  MX only, on their texts), int8 vs fp32 encoder: the head is consulted wherever language and
  mentions do not decide, so this is the encoder's latency as a deployment sees it.

Latency: one text per call, 2 torch threads, p50/p99 over the first (uncached) pass.

    flock /tmp/cm_ray_heavy.lock timeout 900 python bench/router.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_ray.eval import data as D  # noqa: E402
from cm_ray.router.metrics import routing_metrics  # noqa: E402
from cm_ray.router.model import Encoder, train_router  # noqa: E402

CULTURES = ["CN", "DE", "ES", "GB", "ID", "IR", "KR", "MX", "US"]


def corpus_pairs() -> list[tuple[str, str]]:
    out = []
    for f in sorted((REPO / "cm_ray" / "corpus").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            if d.get("culture"):
                out.append((d["text"], d["culture"]))
    return out


def measure(router, items: list[dict], latency_n: int) -> dict:
    texts = [it["text"] for it in items]
    times = []
    for t in texts[:latency_n]:  # uncached: each text routed once, alone
        t0 = time.perf_counter()
        router.route([t])
        times.append((time.perf_counter() - t0) * 1000)
    y = np.array([router.cultures.index(it["culture"]) for it in items])
    m = routing_metrics(router, texts, y)
    pred = router.probabilities(texts).argmax(axis=1)
    by_source, per_culture = {}, {}
    for key, sel in (("blend", lambda it: it["source"] == "blend"),
                     ("culture_tasks", lambda it: it["source"] != "blend")):
        idx = [i for i, it in enumerate(items) if sel(it)]
        by_source[key] = round(float((pred[idx] == y[idx]).mean()), 4) if idx else None
    for c in router.cultures:
        idx = [i for i, it in enumerate(items) if it["culture"] == c]
        per_culture[c] = round(float((pred[idx] == y[idx]).mean()), 4) if idx else None
    from sklearn.metrics import balanced_accuracy_score

    return {"top1": m["accuracy"], "accuracy_at_threshold": m["accuracy_at_threshold"],
            "top1_balanced": round(float(balanced_accuracy_score(y, pred)), 4),
            "coverage": m["coverage"], "ece": m["ece"], "by_source": by_source,
            "per_culture": per_culture, "decided_by": m["decided_by"], "confusion": m["confusion"],
            "p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--per-source", type=int, default=200, help="texts per culture and source")
    p.add_argument("--latency-n", type=int, default=400, help="texts timed one by one per system")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "router.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    root = D.find_data_dir(args.data)
    if root is None:
        print(f"no evaluation data at {args.data}")
        return 1
    items = D.router_items(root, CULTURES, args.per_source, seed=0)
    rng = np.random.default_rng(0)
    items = [items[i] for i in rng.permutation(len(items))]  # latency sample spans cultures
    print(f"{len(items)} real texts: {dict(sorted(Counter(it['culture'] for it in items).items()))}")
    encoders = {False: Encoder("embedded:all-minilm-l6-v2"), True: Encoder("embedded:all-minilm-l6-v2", int8=True)}
    for enc in encoders.values():
        enc(["warm-up"])
    pairs = corpus_pairs()
    full = ("language", "mention", "variety", "content")
    systems = {"language_only": ("language",), "language_mention": ("language", "mention"),
               "language_mention_variety": ("language", "mention", "variety"),
               "router": full, "router_always_encode": full, "router_fp32_always_encode": full,
               "rows_for_all": full, "rows_for_all_fp32": full}
    # rows_for_all*: a run's router, every culture with rows (the corpus's GB, CN, MX), on those
    # cultures' texts: the content head is consulted wherever language does not decide.
    own = [it for it in items if it["culture"] in {c for _, c in pairs}]
    res = {}
    for name, ev in systems.items():
        enc = encoders["fp32" not in name]
        router, fit = train_router(pairs, [], enc, cultures=None if "rows_for_all" in name else CULTURES,
                                   evidence=ev, skip_content_at=1.0 if "always_encode" in name else 0.99)
        router.warm()
        router._emb_cache.clear()
        from cm_ray.router import evidence as E

        E.language_probs.cache_clear()
        res[name] = measure(router, own if "rows_for_all" in name else items, args.latency_n)
        res[name]["temperature"] = fit["temperature"]
        r = res[name]
        print(f"{name:<22} top1 {r['top1']:.3f}  blend {r['by_source']['blend']:.3f}  "
              f"tasks {r['by_source']['culture_tasks']:.3f}  ECE {r['ece']:.3f}  "
              f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  decided {r['decided_by']}")
    print("per culture (router | language_only):")
    for c in CULTURES:
        print(f"  {c}: {res['router']['per_culture'][c]:.3f} | {res['language_only']['per_culture'][c]:.3f}")
    print("confusion (router; rows true, columns routed):")
    print("      " + " ".join(f"{c:>5}" for c in [*CULTURES, "none"]))
    for t in CULTURES:
        print(f"  {t:>3} " + " ".join(f"{res['router']['confusion'][t][c]:>5}" for c in [*CULTURES, "none"]))
    figures = {"top1": res["router"]["top1"], "top1_language_only": res["language_only"]["top1"],
               "top1_balanced": res["router"]["top1_balanced"],
               "top1_balanced_language_only": res["language_only"]["top1_balanced"],
               "top1_without_variety": res["language_mention"]["top1"],
               "top1_fp32_encoder": res["router_fp32_always_encode"]["top1"],
               "top1_vs_language_only": round(res["router"]["top1"] / res["language_only"]["top1"], 4),
               "top1_blend": res["router"]["by_source"]["blend"],
               "top1_culture_tasks": res["router"]["by_source"]["culture_tasks"],
               "ece": res["router"]["ece"], "ece_language_only": res["language_only"]["ece"],
               "p50_ms": res["router"]["p50_ms"], "p99_ms": res["router"]["p99_ms"],
               "p99_always_encode_ms": res["router_always_encode"]["p99_ms"],
               "p99_fp32_always_encode_ms": res["router_fp32_always_encode"]["p99_ms"],
               "p99_vs_fp32_always_encode": round(res["router"]["p99_ms"] / res["router_fp32_always_encode"]["p99_ms"], 4),
               "p99_rows_for_all_ms": res["rows_for_all"]["p99_ms"],
               "p99_rows_for_all_fp32_ms": res["rows_for_all_fp32"]["p99_ms"],
               "p99_int8_vs_fp32_rows_for_all": round(res["rows_for_all"]["p99_ms"] / res["rows_for_all_fp32"]["p99_ms"], 4),
               "top1_rows_for_all": res["rows_for_all"]["top1"],
               "top1_rows_for_all_fp32": res["rows_for_all_fp32"]["top1"],
               "n_texts": len(items), "cultures": len(CULTURES),
               "zero_row_cultures": len(CULTURES) - 3}
    out = {"name": "router", "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/router.py " + " ".join(argv or sys.argv[1:]),
           "machine": "2 cores, no GPU (2 torch threads)", "figures": figures, "systems": res}
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
