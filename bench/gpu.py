"""GPU figures that need only torch, transformers and peft (no Ray, no vLLM, no package index).

On a one-GPU machine (bf16, random-initialised Llama configs: no weights to download):

  1. LoRA SFT steps on a 1B-class Llama (Llama-3.2-1B shape) and on Llama-3.1-8B's shape:
     tokens/s and MFU (model FLOPs utilisation against the card's dense bf16 peak);
  2. packed vs alone: K adapters trained on one loaded base model, taking turns step by step (what a
     cm_ray pack's worker does) vs the same K adapters trained one after another, each on its own
     base load; the ratio is alone wall time / packed wall time (> 1: packing is faster);
  3. PEFT mixed-adapter forward: one batch whose rows name different adapters (``adapter_names``,
     as the transformers serve engine batches cultures) vs the same rows grouped one adapter per
     batch; the ratio is mixed tokens/s / grouped tokens/s. Both outputs are compared row by row.

MFU counts 4·N·T + 12·L·d·s·T FLOPs for T trained tokens of an N-parameter model with L layers,
width d and sequence length s: a LoRA step's base model runs forward (2N) and back-propagates to
the activations (2N) but computes no base-weight gradients; the attention term is PaLM's.

    python bench/gpu.py                         # writes bench/results/gpu.json (~5 min on an H100)
    python bench/gpu.py --smoke --out /tmp/g.json   # tiny shapes on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
             "L4": 121e12, "A10G": 125e12}
"""Dense bf16 peak FLOP/s by card (vendor data sheets, no sparsity)."""

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shape: str, device: torch.device, dtype: torch.dtype, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, cfg


def lora(r: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def batch(cfg, bs: int, seq: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def train_steps(model, cfg, steps: int, bs: int, seq: int, device, warmup: int = 2) -> dict:
    """LoRA steps on random tokens; returns tokens/s over the timed steps and the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses, t0 = [], None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        out = model(**batch(cfg, bs, seq, device, seed=i))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    sync(device)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": steps * bs * seq / dt, "seconds": dt, "losses": losses}


def mfu(tokens_per_s: float, cfg, n_params: int, seq: int, peak: float | None) -> float | None:
    if not peak:
        return None
    flops_per_token = 4 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return tokens_per_s * flops_per_token / peak


def sft(shape: str, steps: int, bs: int, seq: int, device, dtype) -> dict:
    from peft import get_peft_model

    model, cfg = build(shape, device, dtype, seq)
    n = sum(p.numel() for p in model.parameters())
    model.gradient_checkpointing_enable() if shape == "8b" else None
    model.enable_input_require_grads() if shape == "8b" else None
    model = get_peft_model(model, lora())
    r = train_steps(model, cfg, steps, bs, seq, device)
    out = {"params": n, "batch": bs, "seq": seq, "steps": steps, "tokens_per_s": round(r["tokens_per_s"], 1),
           "mfu": mfu(r["tokens_per_s"], cfg, n, seq, peak_flops(device)), "loss_first": r["losses"][0],
           "loss_last": r["losses"][-1], "gradient_checkpointing": shape == "8b"}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def packed_vs_alone(shape: str, k: int, steps: int, bs: int, seq: int, device, dtype) -> dict:
    """K adapters x ``steps``: packed on one base (turns per step) vs one base load per adapter."""
    from peft import get_peft_model

    sync(device)
    t0 = time.perf_counter()
    for a in range(k):
        model, cfg = build(shape, device, dtype, seq)
        model = get_peft_model(model, lora(), adapter_name=f"a{a}")
        train_steps(model, cfg, steps, bs, seq, device, warmup=0)
        del model
    sync(device)
    alone = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, cfg = build(shape, device, dtype, seq)
    model = get_peft_model(model, lora(), adapter_name="a0")
    for a in range(1, k):
        model.add_adapter(f"a{a}", lora())
    opts = {}
    for a in range(k):
        model.set_adapter(f"a{a}")
        opts[a] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for i in range(steps):
        for a in range(k):
            model.set_adapter(f"a{a}")
            out = model(**batch(cfg, bs, seq, device, seed=i))
            out.loss.backward()
            opts[a].step()
            opts[a].zero_grad(set_to_none=True)
    sync(device)
    packed = time.perf_counter() - t0
    del model
    return {"adapters": k, "steps": steps, "alone_s": round(alone, 2), "packed_s": round(packed, 2),
            "packed_vs_alone": round(alone / packed, 3)}


@torch.no_grad()
def mixed_forward(shape: str, k: int, bs: int, seq: int, reps: int, device, dtype) -> dict:
    """One mixed batch (row i -> adapter i % k) vs the same rows grouped by adapter."""
    from peft import get_peft_model

    model, cfg = build(shape, device, dtype, seq)
    model = get_peft_model(model, lora(), adapter_name="a0")
    for a in range(1, k):
        model.add_adapter(f"a{a}", lora())
    for n, p in model.named_parameters():  # LoRA B starts at 0: make every adapter change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    ids = batch(cfg, bs, seq, device)["input_ids"]
    names = [f"a{i % k}" for i in range(bs)]

    def grouped():
        out = torch.empty(bs, seq, cfg.vocab_size, device=device, dtype=dtype)
        for a in range(k):
            rows = [i for i in range(bs) if names[i] == f"a{a}"]
            model.set_adapter(f"a{a}")
            out[rows] = model(input_ids=ids[rows]).logits
        return out

    def mixed():
        return model(input_ids=ids, adapter_names=names).logits

    same = torch.allclose(mixed().float(), grouped().float(), atol=5e-2 if dtype == torch.bfloat16 else 1e-4)
    timing = {}
    for name, fn in (("grouped", grouped), ("mixed", mixed)):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        timing[name] = reps * bs * seq / (time.perf_counter() - t0)
    return {"adapters": k, "batch": bs, "seq": seq, "outputs_match": bool(same),
            "mixed_tokens_per_s": round(timing["mixed"], 1), "grouped_tokens_per_s": round(timing["grouped"], 1),
            "mixed_vs_grouped": round(timing["mixed"] / timing["grouped"], 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (a check that it runs)")
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("bench/gpu.py needs a CUDA GPU (use --smoke to check the script on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small, s = ("tiny", 32) if args.smoke else ("1b", 1024)
    figures: dict = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (smoke on CPU)",
                     "torch": torch.__version__}
    one = sft(small, 4 if args.smoke else 20, 2 if args.smoke else 8, s, device, dtype)
    figures.update(tokens_per_s_gpu_1b=one["tokens_per_s"], mfu_1b=one["mfu"], sft_1b=one)
    if not (args.smoke or args.skip_8b):
        big = sft("8b", 8, 4, 2048, device, dtype)
        figures.update(tokens_per_s_gpu_8b=big["tokens_per_s"], mfu_8b=big["mfu"], sft_8b=big)
    figures["packed"] = packed_vs_alone(small, 4, 2 if args.smoke else 10, 2 if args.smoke else 4, s, device, dtype)
    figures["packed_vs_alone"] = figures["packed"]["packed_vs_alone"]
    figures["mixed"] = mixed_forward(small, 4, 8 if args.smoke else 32, s, 2 if args.smoke else 10, device, dtype)
    figures["mixed_vs_grouped_forward"] = figures["mixed"]["mixed_vs_grouped"]
    result = {"name": "gpu", "date": date.today().isoformat(),
              "command": "python bench/gpu.py" + (" --smoke" if args.smoke else ""),
              "machine": figures["gpu"], "figures": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k in ("gpu", "tokens_per_s_gpu_1b", "mfu_1b", "tokens_per_s_gpu_8b", "mfu_8b", "packed_vs_alone",
              "mixed_vs_grouped_forward"):
        if k in figures:
            print(f"{k:<26} {figures[k]}")
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
