"""Serve throughput on both engines: one adapter vs eight adapters in a random mix, closed-loop
clients over HTTP, the same load on serve.engine=vllm and serve.engine=transformers in one run.

python bench/serve.py --clients 32 --seconds 30           # the issue's setting
python bench/serve.py --engines transformers --base tiny  # the old transformers-only run
python bench/serve.py --num-gpus 1 --max-tokens 64        # GPU

Deploys the real app (ingress + router + adapter servers) on a local Ray with SmolLM2-135M (or
``--base tiny``: a 2-layer random Llama with SmolLM2's tokenizer, transformers only) and 8 random
LoRA adapters, then per engine runs ABBA rounds (single, multi8, multi8, single) so drift on a
busy machine hits both sides alike, and a streaming round (a quarter of the clients) for the time
to first token. Figures: vllm_vs_transformers (multi8 req/s ratio), multi8_vs_single_vllm,
per engine req/s, output tok/s, p50/p99 latency and time to first token, adapter cold-load time
(first request per adapter), router p99 (the ingress's router.predict on one text,
in-process), 5xx count. Writes bench/results/serve.json.
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

    if base != "tiny":
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
                      max_tokens: int, stream: bool = False) -> dict:
    """``clients`` concurrent clients, each sending its next request when the last returns
    (``stream``: SSE requests, timing the first content chunk)."""
    import aiohttp

    lat, statuses, batch_sizes, batch_adapters, ttft, tokens = [], [], [], [], [], []
    prompts = ["Tell me about a festival.", "What do people eat at weddings?",
               "How do you greet an elder?", "Describe a typical breakfast."]
    stop_at = time.perf_counter() + seconds
    rng = random.Random(0)

    async def client(session):
        while time.perf_counter() < stop_at:
            body = {"model": rng.choice(models), "max_tokens": max_tokens, "stream": stream,
                    "messages": [{"role": "user", "content": rng.choice(prompts)}]}
            if stream:
                body["stream_options"] = {"include_usage": True}
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                first, usage = None, None
                if stream and r.status == 200:
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                                first = time.perf_counter()
                            usage = chunk.get("usage") or usage
                else:
                    raw = await r.read()
                    usage = json.loads(raw).get("usage") if r.status == 200 else None
                statuses.append(r.status)
                if r.status == 200:
                    tokens.append((usage or {}).get("completion_tokens", 0))
                    if first is not None:
                        ttft.append((first - t0) * 1000)
                    lat.append((time.perf_counter() - t0) * 1000)
                    batch_sizes.append(int(r.headers.get("X-Batch-Size", 1)))
                    batch_adapters.append(int(r.headers.get("X-Batch-Adapters", 1)))

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [s for s in statuses if s == 200]
    return {"rps": len(ok) / wall, "tok_s": sum(tokens) / wall, "lat": lat, "ttft": ttft, "n": len(statuses),
            "errors_5xx": sum(s >= 500 for s in statuses), "errors_4xx": sum(400 <= s < 500 for s in statuses),
            "batch_size": statistics.mean(batch_sizes) if batch_sizes else 0,
            "batch_adapters": statistics.mean(batch_adapters) if batch_adapters else 0}


def run_engine(engine: str, args, model_dir: str, root: str, port: int) -> dict:
    """Deploy the app on ``engine``, load every adapter once (cold), run the ABBA rounds and the
    streaming round; returns that engine's figures."""
    import requests
    from ray import serve

    from cm_ray.config import load_config
    from cm_ray.serve.app import build_app

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={root}", f"models.base={model_dir}", f"serve.port={port}", f"serve.engine={engine}",
        "serve.max_adapters_per_replica=8", f"serve.max_batch_size={args.max_batch_size}",
        f"serve.max_ongoing_requests={max(64, 2 * args.clients)}", "serve.batch_wait_timeout_s=0.01",
        f"serve.max_new_tokens={args.max_tokens}", f"serve.app_name=bench-{engine}",
        f"serve.num_gpus={args.num_gpus}", "serve.vllm.max_loras=8", "serve.vllm.max_model_len=512",
        f"serve.vllm.max_num_seqs={max(16, args.clients)}", "serve.max_prompt_tokens=128"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    serve.run(build_app(cfg), name=f"bench-{engine}", route_prefix="/")  # returns once healthy
    deploy_s = time.perf_counter() - t0
    try:
        cold, cold_req = [], []  # the first request per adapter loads it
        for c in CULTURES:
            t1 = time.perf_counter()
            r = requests.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": c, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            r.raise_for_status()
            cold_req.append((time.perf_counter() - t1) * 1000)
            cold.append(float(r.headers.get("X-Adapter-Load-Ms", "nan")))
        half = args.seconds / 2
        rounds: dict[str, list] = {"single": [], "multi8": []}
        for name in ["single", "multi8", "multi8", "single"]:
            models = CULTURES[:1] if name == "single" else CULTURES
            res = asyncio.run(closed_loop(url, models, args.clients, half, args.max_tokens))
            rounds[name].append(res)
            print(f"  {engine:<12} {name:<7} {res['rps']:6.2f} req/s {res['tok_s']:7.1f} tok/s  "
                  f"p50 {pct(res['lat'], .5):7.0f} ms  batch {res['batch_size']:.1f} "
                  f"({res['batch_adapters']:.1f} adapters)  5xx {res['errors_5xx']}", file=sys.stderr, flush=True)
        streamed = asyncio.run(closed_loop(url, CULTURES, max(1, args.clients // 4), half,
                                           args.max_tokens, stream=True))
    finally:
        serve.delete(f"bench-{engine}")
        serve.shutdown()

    def agg(rs):
        return {"rps": statistics.mean(r["rps"] for r in rs), "tok_s": statistics.mean(r["tok_s"] for r in rs),
                "lat": [x for r in rs for x in r["lat"]],
                "batch": statistics.mean(r["batch_size"] for r in rs),
                "adapters": statistics.mean(r["batch_adapters"] for r in rs)}

    single, multi = agg(rounds["single"]), agg(rounds["multi8"])
    return {
        "rps_single": round(single["rps"], 2), "rps_multi8": round(multi["rps"], 2),
        "multi8_vs_single": round(multi["rps"] / single["rps"], 3),
        "tok_s_single": round(single["tok_s"], 1), "tok_s_multi8": round(multi["tok_s"], 1),
        "p50_ms": round(pct(multi["lat"], .5), 1), "p99_ms": round(pct(multi["lat"], .99), 1),
        "single_p50_ms": round(pct(single["lat"], .5), 1), "single_p99_ms": round(pct(single["lat"], .99), 1),
        "ttft_p50_ms": round(pct(streamed["ttft"], .5), 1), "ttft_p99_ms": round(pct(streamed["ttft"], .99), 1),
        "stream_clients": max(1, args.clients // 4), "stream_rps": round(streamed["rps"], 2),
        "cold_load_ms": round(statistics.median(cold), 1),
        "cold_request_ms": round(statistics.median(cold_req), 1), "deploy_s": round(deploy_s, 1),
        "mean_batch_multi8": round(multi["batch"], 2),
        "mean_adapters_per_batch_multi8": round(multi["adapters"], 2),
        "errors_5xx": sum(r["errors_5xx"] for rs in rounds.values() for r in rs) + streamed["errors_5xx"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0, help="per scenario (split in 2 rounds)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16, help="transformers engine")
    ap.add_argument("--engines", default="vllm,transformers")
    ap.add_argument("--base", default="embedded:smollm2-135m-instruct",
                    help="base model ref, or 'tiny' (2-layer random Llama; transformers only)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per adapter-server replica")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from cm_ray.ray_utils import init_ray
    from cm_ray.router.model import load_router
    from cm_ray.storage import ArtifactStore

    tmp = Path(tempfile.mkdtemp(prefix="cm-ray-bench-serve-"))
    model_dir, root = build_store(tmp, args.base)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(None, num_cpus=4)
    # router latency: what the ingress runs per auto request, on one text at a time
    router = load_router(ArtifactStore(root))
    texts = [t for ts in ROUTER_TEXTS.values() for t in ts] * 20
    router.predict(texts[:4])
    rl = []
    for t in texts:
        t0 = time.perf_counter()
        router.predict([t])
        rl.append((time.perf_counter() - t0) * 1000)
    engines = {e: run_engine(e, args, model_dir, root, port) for e in args.engines.split(",")}
    figures: dict = {}
    if {"vllm", "transformers"} <= engines.keys():
        figures["vllm_vs_transformers"] = round(engines["vllm"]["rps_multi8"] / engines["transformers"]["rps_multi8"], 3)
    if "vllm" in engines:
        figures["multi8_vs_single_vllm"] = engines["vllm"]["multi8_vs_single"]
    if "transformers" in engines:
        figures["multi8_vs_single_transformers"] = engines["transformers"]["multi8_vs_single"]
    faster = max(engines, key=lambda e: engines[e]["rps_multi8"])
    # the long-standing keys: those of the faster engine (the one the demo serves)
    figures.update({k: engines[faster][k] for k in ("multi8_vs_single", "p50_ms", "p99_ms", "cold_load_ms")})
    figures.update({"router_p99_ms": round(pct(rl, .99), 2), "router_p50_ms": round(pct(rl, .5), 2),
                    "errors_5xx": sum(e["errors_5xx"] for e in engines.values()),
                    "faster_engine": faster,
                    "clients": args.clients, "seconds_per_scenario": args.seconds,
                    "max_tokens": args.max_tokens, "base": args.base})
    print(f"\n{'engine':<14}{'req/s 1':>9}{'req/s 8':>9}{'tok/s 8':>9}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'ttft p50':>9}{'ttft p99':>9}{'cold ms':>8}")
    for name, e in engines.items():
        print(f"{name:<14}{e['rps_single']:>9.2f}{e['rps_multi8']:>9.2f}{e['tok_s_multi8']:>9.1f}"
              f"{e['p50_ms']:>8.0f}{e['p99_ms']:>8.0f}{e['ttft_p50_ms']:>9.0f}{e['ttft_p99_ms']:>9.0f}"
              f"{e['cold_load_ms']:>8.1f}")
    print(" ".join(f"{k} {v}" for k, v in figures.items()))
    out = {"name": "serve", "date": datetime.date.today().isoformat(),
           "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()} cores, " + (
               f"{args.num_gpus:g} GPU" if args.num_gpus else "no GPU (shared)"),
           "figures": figures, "engines": engines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
