"""Serve throughput: one adapter vs eight adapters in a random mix, closed-loop clients over HTTP.

python bench/serve.py --clients 32 --seconds 30           # the issue's setting
python bench/serve.py --clients 16 --seconds 12           # what fits a shared 2-core box
python bench/serve.py --base embedded:smollm2-135m-instruct --num-gpus 1 --max-tokens 64  # GPU

Deploys the real app (ingress + router + AdapterServer) on a local Ray with a 2-layer random Llama
(SmolLM2's tokenizer) and 8 random LoRA adapters, then runs ABBA rounds (single, multi8, multi8,
single) so drift on a busy machine hits both sides alike. Figures: multi8_vs_single (req/s ratio),
p50/p99 latency of the multi8 rounds, adapter cold-load time (first request per adapter),
router p99 (the ingress's router.predict on one text, in-process), 5xx count.
Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CULTURES = ["GB", "CN", "MX", "JP", "DE", "FR", "IN", "BR"]
ROUTER_TEXTS = {
    "GB": ["We queued for tea and biscuits.", "Fish and chips at the pub after the football.",
           "Sunday roast with Yorkshire pudding.", "The Tube was packed this morning."],
    "CN": ["春节我们一起包饺子。", "中秋节吃月饼赏月。", "长辈给晚辈发红包。", "端午节吃粽子赛龙舟。"],
    "MX": ["Pan de muerto en la ofrenda.", "Tacos al pastor después del partido.",
           "Rompimos la piñata en la posada.", "El mariachi tocó las mañanitas."],
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def build_store(root: Path, base: str | None = None) -> tuple[str, str]:
    """Base model (tiny random Llama unless ``base``), 8 random adapters on it and a router under
    ``root``; returns (model_dir, store root)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cm_ray.models import resolve_model
    from cm_ray.router.model import Encoder, train_router
    from cm_ray.storage import ArtifactStore

    if base:
        model_dir = Path(resolve_model(base))
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
        torch.manual_seed(0)
        model_dir = root / "tiny"
        LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    store = ArtifactStore(str(root / "store"))
    for seed, c in enumerate(CULTURES):
        torch.manual_seed(seed)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        m.save_pretrained(root / "store" / "adapters" / c)
    pairs = [(t, c) for c, ts in ROUTER_TEXTS.items() for t in ts]
    router, _ = train_router(pairs, pairs, Encoder("embedded:all-minilm-l6-v2"))
    router.save(store, "router")
    return str(model_dir), store.root


async def closed_loop(url: str, models: list[str], clients: int, seconds: float,
                      max_tokens: int) -> dict:
    """``clients`` concurrent clients, each sending its next request when the last returns."""
    import aiohttp

    lat, statuses, batch_sizes, batch_adapters = [], [], [], []
    prompts = ["Tell me about a festival.", "What do people eat at weddings?",
               "How do you greet an elder?", "Describe a typical breakfast."]
    stop_at = time.perf_counter() + seconds
    rng = random.Random(0)

    async def client(session):
        while time.perf_counter() < stop_at:
            body = {"model": rng.choice(models), "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": rng.choice(prompts)}]}
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
                statuses.append(r.status)
                if r.status == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                    batch_sizes.append(int(r.headers.get("X-Batch-Size", 1)))
                    batch_adapters.append(int(r.headers.get("X-Batch-Adapters", 1)))

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [s for s in statuses if s == 200]
    return {"rps": len(ok) / wall, "lat": lat, "n": len(statuses),
            "errors_5xx": sum(s >= 500 for s in statuses), "errors_4xx": sum(400 <= s < 500 for s in statuses),
            "batch_size": statistics.mean(batch_sizes) if batch_sizes else 0,
            "batch_adapters": statistics.mean(batch_adapters) if batch_adapters else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0, help="per scenario (split in 2 rounds)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--base", default=None,
                    help="base model ref (e.g. embedded:smollm2-135m-instruct); default tiny random")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the AdapterServer replica")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import requests
    from ray import serve

    from cm_ray.config import load_config
    from cm_ray.ray_utils import init_ray
    from cm_ray.router.model import load_router
    from cm_ray.serve.app import build_app
    from cm_ray.storage import ArtifactStore

    tmp = Path(tempfile.mkdtemp(prefix="cm-ray-bench-serve-"))
    model_dir, root = build_store(tmp, args.base)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={root}", f"models.base={model_dir}", f"serve.port={port}",
        "serve.max_adapters_per_replica=8", f"serve.max_batch_size={args.max_batch_size}",
        f"serve.max_ongoing_requests={max(64, 2 * args.clients)}", "serve.batch_wait_timeout_s=0.01",
        f"serve.max_new_tokens={args.max_tokens}", "serve.app_name=bench",
        f"serve.num_gpus={args.num_gpus}"])
    init_ray(cfg, num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
        # cold loads: the first request per adapter loads it (the replica holds all 8 afterwards)
        cold = []
        for c in CULTURES:
            r = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": c, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            r.raise_for_status()
            cold.append(float(r.headers.get("X-Adapter-Load-Ms", "nan")))
        # router latency: what the ingress runs per auto request, on one text at a time
        router = load_router(ArtifactStore(root))
        texts = [t for ts in ROUTER_TEXTS.values() for t in ts] * 20
        router.predict(texts[:4])
        rl = []
        for t in texts:
            t0 = time.perf_counter()
            router.predict([t])
            rl.append((time.perf_counter() - t0) * 1000)

        half = args.seconds / 2
        rounds = {"single": [], "multi8": []}
        for name in ["single", "multi8", "multi8", "single"]:
            models = CULTURES[:1] if name == "single" else CULTURES
            res = asyncio.run(closed_loop(url, models, args.clients, half, args.max_tokens))
            rounds[name].append(res)
            print(f"  {name:<7} {res['rps']:6.2f} req/s  p50 {pct(res['lat'], .5):7.0f} ms  "
                  f"batch {res['batch_size']:.1f} ({res['batch_adapters']:.1f} adapters)  "
                  f"5xx {res['errors_5xx']}", file=sys.stderr, flush=True)
    finally:
        serve.delete("bench")
        serve.shutdown()

    def agg(rs):
        return {"rps": statistics.mean(r["rps"] for r in rs), "lat": [x for r in rs for x in r["lat"]],
                "batch": statistics.mean(r["batch_size"] for r in rs),
                "adapters": statistics.mean(r["batch_adapters"] for r in rs)}

    single, multi = agg(rounds["single"]), agg(rounds["multi8"])
    errors = sum(r["errors_5xx"] for rs in rounds.values() for r in rs)
    figures = {
        "multi8_vs_single": round(multi["rps"] / single["rps"], 3),
        "p50_ms": round(pct(multi["lat"], .5), 1), "p99_ms": round(pct(multi["lat"], .99), 1),
        "cold_load_ms": round(statistics.median(cold), 1),
        "router_p99_ms": round(pct(rl, .99), 2), "errors_5xx": errors,
        "rps_single": round(single["rps"], 2), "rps_multi8": round(multi["rps"], 2),
        "single_p50_ms": round(pct(single["lat"], .5), 1),
        "single_p99_ms": round(pct(single["lat"], .99), 1),
        "router_p50_ms": round(pct(rl, .5), 2),
        "mean_batch_single": round(single["batch"], 2), "mean_batch_multi8": round(multi["batch"], 2),
        "mean_adapters_per_batch_multi8": round(multi["adapters"], 2),
        "clients": args.clients, "seconds_per_scenario": args.seconds, "max_tokens": args.max_tokens,
    }
    print(f"\n{'scenario':<10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'adapters':>10}")
    for name, a in (("single", single), ("multi8", multi)):
        print(f"{name:<10}{a['rps']:>8.2f}{pct(a['lat'], .5):>9.0f}{pct(a['lat'], .99):>9.0f}"
              f"{a['batch']:>7.1f}{a['adapters']:>10.1f}")
    print(f"multi8_vs_single {figures['multi8_vs_single']}  cold_load_ms {figures['cold_load_ms']}  "
          f"router_p99_ms {figures['router_p99_ms']}  errors_5xx {errors}")
    out = {"name": "serve", "date": datetime.date.today().isoformat(),
           "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()} cores, " + (
               f"{args.num_gpus:g} GPU" if args.num_gpus else "no GPU (shared)"),
           "figures": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
