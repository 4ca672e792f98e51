"""AdapterPool without Ray: mixed-adapter batches, unique adapter names, deferred unloads.

python -m pytest tests/cpu/test_serve_adapters.py -q
"""

from pathlib import Path

import json

import pytest

from cm_ray.serve.pool import BASE_ADAPTER, AdapterPool, LoadedAdapter


def make_adapter(base_dir: str, out_dir: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter on the tiny model with random lora_B (so adapters really differ)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {c: make_adapter(tiny_model_dir, root / c, seed) for seed, c in enumerate(["GB", "CN", "MX"])}


@pytest.fixture
def pool(tiny_model_dir):
    return AdapterPool(tiny_model_dir)


def _item(prompt, adapter, n=8, **kw):
    return {"prompt": prompt, "adapter": adapter, "max_new_tokens": n, "temperature": 0.0,
            "top_p": 1.0, "stop": None, **kw}


def test_mixed_adapter_batch_matches_each_adapter_alone(pool, adapter_dirs):
    names = {c: pool.load(str(d), c) for c, d in adapter_dirs.items()}
    prompts = ["Hello there, how are", "What do people eat at a wedding in",
               "Tea or coffee?", "Tell me about a festival", "Hello there, how are"]
    adapters = [names["GB"], names["CN"], names["MX"], BASE_ADAPTER, names["MX"]]
    items = [_item(p, a) for p, a in zip(prompts, adapters)]
    mixed = pool.generate(items)
    alone = [pool.generate([it])[0] for it in items]
    assert [m["text"] for m in mixed] == [a["text"] for a in alone]
    assert {m["batch_size"] for m in mixed} == {5} and mixed[0]["batch_adapters"] == 4
    # the adapters really differ: one prompt, four answers
    same_prompt = pool.generate([_item(prompts[0], a) for a in [*names.values(), BASE_ADAPTER]])
    assert len({r["text"] for r in same_prompt}) == 4


def test_each_load_gets_a_unique_adapter_name(pool, adapter_dirs):
    a = pool.load(str(adapter_dirs["MX"]), "MX")
    b = pool.load(str(adapter_dirs["MX"]), "MX")
    assert a != b and {a, b} <= set(pool.loaded)


def test_eviction_del_is_idempotent_and_waits_for_running_requests(pool, adapter_dirs):
    gb = LoadedAdapter(pool, "GB", pool.load(str(adapter_dirs["GB"]), "GB"), 1.0)
    cn = LoadedAdapter(pool, "CN", pool.load(str(adapter_dirs["CN"]), "CN"), 1.0)
    gb.__del__()
    gb.__del__()  # Serve calls it on eviction, Python may call it again
    assert pool.loaded == [cn.name]
    mx = pool.load(str(adapter_dirs["MX"]), "MX")
    pool.acquire(cn.name)  # a batch still uses CN
    cn.__del__()
    assert cn.name in pool.loaded
    pool.release(cn.name)
    pool.generate([_item("hi", mx, 2)])  # the next batch reaps it
    assert pool.loaded == [mx]


def test_last_adapter_stays_loaded_until_another_replaces_it(pool, adapter_dirs):
    gb = pool.load(str(adapter_dirs["GB"]), "GB")
    pool.unload(gb)
    assert pool.loaded == [gb]  # PEFT cannot run with zero adapters
    assert pool.generate([_item("hi", BASE_ADAPTER, 2)])[0]["completion_tokens"] == 2
    cn = pool.load(str(adapter_dirs["CN"]), "CN")
    assert pool.loaded == [cn]


def test_base_only_before_any_adapter_and_per_request_lengths(pool):
    out = pool.generate([_item("Hello", BASE_ADAPTER, 3), _item("Hello", BASE_ADAPTER, 6)])
    assert [o["completion_tokens"] for o in out] == [3, 6]
    assert out[1]["text"].startswith(out[0]["text"])  # greedy: the short one is a prefix
    assert all(o["finish_reason"] == "length" for o in out)


def test_stop_strings_cut_the_answer(pool):
    full = pool.generate([_item("Hello", BASE_ADAPTER, 6)])[0]["text"]
    stop = full[len(full) // 2:][:2]
    cut = pool.generate([_item("Hello", BASE_ADAPTER, 6, stop=[stop])])[0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]


def test_chat_payload_uses_the_chat_template(pool):
    text = pool.prompt_text({"messages": [{"role": "user", "content": "Hola"}]})
    assert "Hola" in text and text != "Hola"
    assert pool.prompt_text({"prompt": "raw"}) == "raw"


def corrupt_adapter(base_dir: str, out_dir: Path, how: str) -> Path:
    """A real adapter dir whose weights cannot load: garbage bytes, or the wrong LoRA rank."""
    make_adapter(base_dir, out_dir, seed=11)
    if how == "garbage":
        (out_dir / "adapter_model.safetensors").write_bytes(b"\x07" * 4096)
    else:  # config says r=4, the weights have r=8: PEFT fails after registering the adapter
        import json
        import shutil

        shutil.copy(make_adapter(base_dir, out_dir.with_name(out_dir.name + "-r8"), 12, r=8)
                    / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
        assert json.loads((out_dir / "adapter_config.json").read_text())["r"] == 4
    return out_dir


def _lora_names(pool) -> set[str]:
    """Adapter names by identity in the model's LoRA layers (not only in peft_config)."""
    names: set[str] = set()
    for module in pool.model.modules():
        if hasattr(module, "lora_A"):
            names |= set(module.lora_A.keys())
    return names


@pytest.mark.parametrize("how", ["garbage", "rank"])
@pytest.mark.parametrize("first", [True, False], ids=["first-load", "after-good-load"])
def test_failed_loads_leave_nothing_behind(pool, adapter_dirs, tiny_model_dir, tmp_path, how, first):
    """Issue 18 defect 2: every failed load used to leave its adapter registered (8 -> 102)."""
    bad = corrupt_adapter(tiny_model_dir, tmp_path / "BR", how)
    good = None if first else pool.load(str(adapter_dirs["GB"]), "GB")
    before = list(pool.loaded)
    params = sum(p.numel() for p in pool.model.parameters())
    for _ in range(6):
        with pytest.raises(Exception):
            pool.load(str(bad), "BR")
        assert pool.loaded == before and _lora_names(pool) == set(before)
        assert sum(p.numel() for p in pool.model.parameters()) == params
    # the pool still serves: the good adapter (or the base model) and a new good load
    cn = pool.load(str(adapter_dirs["CN"]), "CN")
    out = pool.generate([_item("hi", a, 2) for a in filter(None, [good, cn, BASE_ADAPTER])])
    assert all(o["completion_tokens"] == 2 for o in out)
    assert set(pool.loaded) == {cn} | ({good} if good else set()) == _lora_names(pool)


def test_a_failed_first_load_restores_the_plain_base_model(pool, tiny_model_dir, tmp_path):
    base_out = pool.generate([_item("Hello", BASE_ADAPTER, 5)])[0]["text"]
    with pytest.raises(Exception):
        pool.load(str(corrupt_adapter(tiny_model_dir, tmp_path / "BR", "garbage")), "BR")
    assert pool.loaded == [] and not _lora_names(pool)
    assert pool.generate([_item("Hello", BASE_ADAPTER, 5)])[0]["text"] == base_out


def test_max_time_bounds_a_batch_the_ingress_gave_up_on(pool):
    """A request past the deployment's timeout is cancelled upstream; the forward batch it started
    stops at ``max_time_s`` instead of running to max_new_tokens."""
    item = _item("Tell me a long story about a festival", BASE_ADAPTER, n=400)
    pool.max_time_s = 0.05
    (out,) = pool.generate([item])
    assert out["completion_tokens"] < 400 and out["finish_reason"] == "length"  # 400 without max_time


def _overflowing(base_dir, out, factor):
    """An adapter whose lora_B is scaled by ``factor`` (1e38: finite weights, non-finite logits)."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_dir, out, 9)
    w = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v * factor if "lora_B" in k else v for k, v in w.items()}, str(out / "adapter_model.safetensors"))
    return out


def test_an_adapter_yielding_non_finite_logits_fails_only_its_own_row(pool, adapter_dirs, tiny_model_dir, tmp_path):
    """Sampling over NaN logits raises inside generate: without the guard the whole mixed batch
    failed. With it the bad row ends at once and is flagged; its neighbours are answered."""
    gb = pool.load(str(adapter_dirs["GB"]), "GB")
    bad = pool.load(str(_overflowing(tiny_model_dir, tmp_path / "PT", 1e38)), "PT")
    items = [_item("Hello there", a, 6, temperature=0.8) for a in (gb, bad, BASE_ADAPTER)]
    out = pool.generate(items)
    assert [o["non_finite"] for o in out] == [False, True, False]
    assert out[0]["completion_tokens"] > 0 and out[2]["completion_tokens"] > 0
    greedy = pool.generate([_item("Hello there", a, 6) for a in (gb, bad)])
    assert [o["non_finite"] for o in greedy] == [False, True]
    assert greedy[0]["text"] == pool.generate([_item("Hello there", gb, 6)])[0]["text"]


def test_a_cancelled_stream_stops_generating(pool):
    import threading

    from transformers import TextIteratorStreamer

    cancel = threading.Event()
    cancel.set()  # the client is already gone
    streamer = TextIteratorStreamer(pool.tokenizer, skip_prompt=True, timeout=60)
    out = pool.stream(_item("Tell me a long story", BASE_ADAPTER, 40), streamer, cancel)
    assert out["completion_tokens"] <= 1 and out["non_finite"] is False


def test_a_failed_mixed_batch_is_rerun_request_by_request():
    import asyncio

    from cm_ray.serve.pool import MixedBatcher

    def run(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return [f"ok {i}" for i in items]

    async def main():
        b = MixedBatcher(run, 8, 0.05)
        return await asyncio.gather(*(b.submit(i) for i in ("a", "bad", "c")), return_exceptions=True)

    got = asyncio.run(main())
    assert got[0] == "ok a" and got[2] == "ok c" and isinstance(got[1], RuntimeError)


def test_adapter_checks_name_what_neither_engine_can_serve(tiny_model_dir, adapter_dirs, tmp_path):
    import shutil

    from cm_ray.serve.adapter_check import weights_problem

    assert weights_problem(str(adapter_dirs["GB"]), tiny_model_dir) is None
    cases = {"use_dora": (True, "DoRA"), "modules_to_save": (["lm_head"], "modules_to_save"),
             "target_modules": (["q_proj", "nope_proj"], "nope_proj"), "peft_type": ("IA3", "LORA"),
             "r": (0, "positive")}
    for key, (value, words) in cases.items():
        d = shutil.copytree(adapter_dirs["GB"], tmp_path / key)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        assert words in (weights_problem(str(d), tiny_model_dir) or ""), key
    assert "NaN" in weights_problem(str(_overflowing(tiny_model_dir, tmp_path / "nan", float("nan"))), tiny_model_dir)
    # finite weights whose update overflows a float: every logit of the adapter would be NaN
    assert "non-finite outputs" in weights_problem(str(_overflowing(tiny_model_dir, tmp_path / "big", 1e38)),
                                                 tiny_model_dir)
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(adapter_dirs["GB"], tmp_path / "narrow")
    w = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v[:3].contiguous() if "lora_B" in k else v for k, v in w.items()}, str(d / "adapter_model.safetensors"))
    assert "shape" in weights_problem(str(d), tiny_model_dir)


def test_a_modules_to_save_adapter_is_refused_before_it_touches_the_model(pool, adapter_dirs, tmp_path, tiny_model_dir):
    """PEFT could not load it and left the model broken for every other adapter: the servers run
    weights_problem first, so the model never sees it; the others keep answering."""
    import shutil

    from cm_ray.serve.adapter_check import weights_problem

    gb = pool.load(str(adapter_dirs["GB"]), "GB")
    before = pool.generate([_item("Hello", gb, 4)])[0]["text"]
    d = shutil.copytree(adapter_dirs["CN"], tmp_path / "mts")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    assert "modules_to_save" in weights_problem(str(d), tiny_model_dir)
    assert pool.generate([_item("Hello", gb, 4)])[0]["text"] == before
