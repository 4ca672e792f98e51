"""A published adapter names its base by the reference it was trained from (an ``embedded:`` name or
a hub id), never by the model-cache path that reference resolved to on the training node; and the
loaders find the base from that reference (train-free: real PEFT models, real publish functions).

python -m pytest tests/cpu/test_adapter_portable.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EMBEDDED = "embedded:smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _lora(model, name: str = "default"):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"), adapter_name=name)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-trivial adapter: loading it changes logits
    return peft_model


def _published(root: str, name: str, into: Path) -> Path:
    from cm_ray import artifacts
    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(root)
    parts, _ = artifacts.published_adapter(store, name)
    return store.download_dir(into, *parts)


def _no_path_in(adapter: Path, path: str) -> None:
    for f in adapter.iterdir():
        if f.suffix in (".json", ".md"):
            assert path not in f.read_text(), f"{f.name} names the training node's path {path}"


def _logits(model, tok) -> list[float]:
    import torch

    with torch.no_grad():
        return model(**tok("The customs of my country", return_tensors="pt")).logits[0, -1, :8].tolist()


def test_one_adapter_publish_names_the_embedded_base_and_loaders_find_it(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cm_ray.eval.systems import EvalModel
    from cm_ray.models import resolve_model
    from cm_ray.train.save import write_and_publish

    assert resolve_model(EMBEDDED) == smollm2_dir  # what the training node loaded: a cache path
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = _lora(AutoModelForCausalLM.from_pretrained(smollm2_dir))
    model.eval()
    trained = _logits(model, tok)
    spec = {"root": str(tmp_path / "root"), "adapter": "GB", "model_ref": EMBEDDED}
    write_and_publish(model, tmp_path / "out", spec, {"base_model": EMBEDDED})

    adapter = _published(spec["root"], "GB", tmp_path / "copy")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED
    _no_path_in(adapter, smollm2_dir)

    # Whoever reads the adapter finds its base from the recorded reference, on their own node.
    base_dir = resolve_model(config["base_model_name_or_path"])
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    assert _logits(loaded, tok) == pytest.approx(trained, abs=1e-4)
    ev = EvalModel(base_dir, {"GB": str(adapter)})
    with ev.using("GB"):
        assert _logits(ev.lm, tok) == pytest.approx(trained, abs=1e-4)


def test_packed_publish_names_the_hub_base_and_loads_with_the_base_given(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cm_ray.serve.pool import AdapterPool
    from cm_ray.train.pack_loop import Slot
    from cm_ray.train.pack_worker import publish

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "MX")
    model.eval()
    trained = _logits(model, tok)
    root = str(tmp_path / "root")
    publish(model, Slot(name="MX", phases=[], total_steps=0, train=[], val=[]), {"base_model": HUB_ID}, root)

    adapter = _published(root, "MX", tmp_path / "copy")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    _no_path_in(adapter, tiny_model_dir)

    # Offline, with the base given: the hub id is a name, never fetched.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    assert _logits(loaded, tok) == pytest.approx(trained, abs=1e-4)
    pool = AdapterPool(tiny_model_dir)
    name = pool.load(str(adapter), "MX")
    pool.model.set_adapter(name)
    assert _logits(pool.model, tok) == pytest.approx(trained, abs=1e-4)
