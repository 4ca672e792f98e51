"""Train throughput: the Ray Train + DeepSpeed path vs a single-process PEFT loop (same model, data, cores).

    python bench/train.py                       # CPU: SmolLM2-135M-Instruct, 2 threads, 24 steps
    python bench/train.py --model tiny          # the 2-layer random Llama of the tests
    python bench/train.py --gpu --arch llama-1b # GPU host: bf16, tokens/s and MFU
    python bench/train.py --gpu --arch llama-8b

Both sides run the same steps on the same token rows (no shuffling, same batches), and both time
steady-state optimizer steps only: the first step is excluded, and for Ray so are the Tune / Train
worker start-up, model load and DeepSpeed initialization. The Ray figure is the worker's own
``tokens_per_s`` from ``adapters/<culture>/metrics.json``. The single-process baseline runs before
and after the Ray run (the machine is shared) and their mean is the denominator.
MFU (GPU): model FLOPs 6 * N * tokens + attention 12 * layers * hidden * seq * tokens, over the
dense bf16 peak of the GPU (H100/H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
ARCHS = {  # Llama-3.2-1B / Llama-3.1-8B shapes, random weights (throughput does not need real ones)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8),
}


def make_rows(n: int) -> list[dict]:
    from cm_ray.tasks import load_task

    rows = []
    specs = [load_task("offensive"), load_task("survey")]
    for i in range(n):
        spec = specs[i % 2]
        msgs = spec.messages(spec.examples[i % len(spec.examples)])
        msgs[0]["content"] += f"\nRespondent {i}: answer as people in GB usually would."
        rows.append({"id": str(i), "culture": "GB", "task": spec.name, "split": "train",
                     "input": msgs[0]["content"], "output": msgs[1]["content"], "messages": msgs})
    return rows


def single_process(model_dir: str, rows: list[dict], tc, steps: int, device: str) -> float:
    """Steady-state tokens/s of a plain PEFT + torch AdamW loop (first step excluded)."""
    import torch
    from transformers import get_scheduler

    from cm_ray.models import default_dtype
    from cm_ray.train.data import collate, get_tokenizer, tokenize_chat
    from cm_ray.train.lora import load_base_model, make_lora_model

    tok = get_tokenizer(model_dir)
    toks = [tokenize_chat(tok, r["messages"], tc.max_seq_len) for r in rows]
    model = make_lora_model(load_base_model(model_dir, default_dtype(device), device), tc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=int(tc.warmup_ratio * steps),
                          num_training_steps=steps)
    model.train()
    t0, tokens, i = None, 0, 0
    for step in range(steps):
        n_step = 0
        for _ in range(tc.grad_accum):
            b = [toks[(i + k) % len(toks)] for k in range(tc.batch_size)]
            i += tc.batch_size
            batch = collate({"input_ids": [x["input_ids"] for x in b], "labels": [x["labels"] for x in b]},
                            tok.pad_token_id, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(**batch).loss
            (loss / tc.grad_accum).backward()
            n_step += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if t0 is None:
            t0 = time.perf_counter()
        else:
            tokens += n_step
    return tokens / (time.perf_counter() - t0)


def ray_path(model_dir: str, rows: list[dict], overrides: list[str], root: str) -> dict:
    from cm_ray.config import load_config
    from cm_ray.ray_utils import init_ray
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.tune import run_training

    store = ArtifactStore(root)
    store.write_table(rows, "synth", "culture=GB", "task=bench", "part-0.parquet")
    cfg = load_config(None, [f"root={root}", "cultures=[GB]", "tasks=[bench]", f"models.base={model_dir}",
                             "train.joint_baseline=false", "train.shuffle_buffer=0", *overrides])
    init_ray(cfg)
    summary = run_training(cfg, store, force=True)
    if summary["failed"]:
        raise RuntimeError(f"Ray Train run failed: {summary['failed']}")
    from cm_ray.artifacts import published_adapter

    return store.read_json(*published_adapter(store, "GB")[0], "metrics.json")


def random_arch(arch: str, tokenizer_dir: str, out: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **ARCHS[arch])
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def model_flops_per_token(model_dir: str, seq: int) -> tuple[float, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, L, inter, v = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    n = L * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * v * h  # matmul weights (embeddings incl.)
    return 6 * n + 12 * L * h * seq, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model directory")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for each side")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--arch", choices=list(ARCHS), default="llama-1b", help="--gpu: random-weight shape")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = p.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # Ray workers inherit it via init_ray
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/cm_ray/torch_extensions"))
    import torch

    from cm_ray.config import TrainConfig
    from cm_ray.models import resolve_model

    torch.set_num_threads(args.threads)
    smollm2 = resolve_model("embedded:smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="cm-ray-bench-train-"))
    if args.gpu:
        model_dir, label = random_arch(args.arch, smollm2, tmp / args.arch), args.arch
    elif args.model == "smollm2":
        model_dir, label = smollm2, "SmolLM2-135M-Instruct"
    elif args.model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        tok = AutoTokenizer.from_pretrained(smollm2)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True)).save_pretrained(tmp / "tiny")
        tok.save_pretrained(tmp / "tiny")
        model_dir, label = str(tmp / "tiny"), "tiny 2-layer Llama"
    else:
        model_dir, label = args.model, args.model
    device = "cuda" if args.gpu else "cpu"
    rows = make_rows(max(64, args.steps * args.batch_size))
    n_workers = torch.cuda.device_count() if args.gpu else 1
    tc = TrainConfig(lr=1e-4, batch_size=args.batch_size, max_seq_len=args.seq)
    overrides = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                 f"train.max_seq_len={args.seq}", "train.lr=1.0e-4", "train.epochs=100",
                 f"train.cpus_per_worker={args.threads}", f"train.num_workers={n_workers}",
                 f"train.use_gpu={'true' if args.gpu else 'false'}",
                 f"train.deepspeed={{zero_optimization: {{stage: {args.zero}}}}}"]
    if not args.gpu:
        overrides.append(f"ray.num_cpus={max(4, args.threads + 2)}")

    base1 = single_process(model_dir, rows, tc, args.steps, device)
    m = ray_path(model_dir, rows, overrides, str(tmp / "root"))
    base2 = single_process(model_dir, rows, tc, args.steps, device)
    base = (base1 + base2) / 2
    ray_tps = m["tokens_per_s"]
    # Per device: the baseline is one process on one device (or the same CPU threads).
    figures = {"raytrain_ds_vs_single": round(ray_tps / n_workers / base, 3), "model": label,
               "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
               "zero_stage": args.zero, "workers": n_workers, "single_tokens_per_s": [round(base1, 1), round(base2, 1)]}
    if args.gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        mean_len = m["tokens"] / max(1, m["steps"]) / args.batch_size / n_workers
        fpt, n_params = model_flops_per_token(model_dir, int(mean_len))
        key = args.arch.split("-")[1]
        figures.update({"gpu": name, f"tokens_per_s_gpu_{key}": round(ray_tps, 1), "params": n_params})
        if peak:
            figures[f"mfu_{key}"] = round(fpt * ray_tps / (peak * n_workers), 4)
    else:
        figures["tokens_per_s_cpu"] = round(ray_tps, 1)
    print(f"{'path':<34} {'tokens/s':>10}")
    print(f"{'single-process PEFT (before)':<34} {base1:>10.1f}")
    print(f"{'Ray Train + DeepSpeed ZeRO-' + str(args.zero):<34} {ray_tps:>10.1f}")
    print(f"{'single-process PEFT (after)':<34} {base2:>10.1f}")
    print(f"ratio raytrain_ds_vs_single = {figures['raytrain_ds_vs_single']}  ({label}, {args.steps} steps)")
    out = {"name": "train", "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": (f"{torch.cuda.get_device_name()}" if args.gpu else f"{os.cpu_count()} cores, no GPU"),
           "figures": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
