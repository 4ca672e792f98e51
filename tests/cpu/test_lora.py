"""LoRA building, presets, saving and reloading with plain PEFT (no Ray).

python -m pytest tests/cpu/test_lora.py -q
"""

from __future__ import annotations


import pytest

from cm_ray.config import ConfigError, TrainConfig, load_config
from cm_ray.config import PRESETS, apply_preset
from cm_ray.train.lora import (EmptyAdapterError, check_adapter, load_base_model,
                               make_lora_model, save_adapter, trainable_parameter_names)


def _perturbed(model_dir, **kw):
    import torch

    torch.manual_seed(1)
    model = make_lora_model(load_base_model(model_dir), TrainConfig(**kw))
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def test_only_lora_parameters_are_trainable(tiny_model_dir):
    model = make_lora_model(load_base_model(tiny_model_dir), TrainConfig(target_modules=["all-linear"]))
    names = trainable_parameter_names(model)
    assert names and all("lora_" in n for n in names)
    # all-linear reaches the MLP too, never the output head
    assert any("mlp" in n for n in names) and not any("lm_head" in n for n in names)


def test_saved_adapter_reloads_with_identical_logits_in_plain_peft(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel

    model = _perturbed(tiny_model_dir).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "GB")
    assert (tmp_path / "GB" / "adapter_config.json").exists()
    assert (tmp_path / "GB" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(load_base_model(tiny_model_dir), str(tmp_path / "GB")).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
        base = load_base_model(tiny_model_dir).eval()(input_ids=ids).logits
    assert torch.equal(trained, again)
    assert not torch.allclose(trained, base)


def test_empty_adapter_is_rejected_never_saved_silently(tiny_model_dir, tmp_path):
    import torch

    model = _perturbed(tiny_model_dir)
    # What ZeRO-3 hands save_pretrained when partitions are not gathered: 0-element placeholders.
    empty = {n: torch.empty(0) for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(EmptyAdapterError, match="not gathered"):
        save_adapter(model, tmp_path / "bad", state_dict=empty)
    with pytest.raises(EmptyAdapterError, match="missing"):
        check_adapter(tmp_path / "nothing-here")


def test_presets_fill_defaults_but_explicit_settings_win():
    spa = apply_preset(TrainConfig(preset="culturespa"))
    assert (spa.lora_r, spa.lora_alpha, spa.target_modules, spa.lr, spa.epochs, spa.scheduler,
            spa.warmup_ratio) == (8, 16.0, ["all-linear"], 1e-4, 1.0, "cosine", 0.1)
    clca = apply_preset(TrainConfig(preset="clca", epochs=5.0))
    assert (clca.lora_r, clca.lora_alpha, clca.lora_dropout, clca.target_modules, clca.batch_size,
            clca.grad_accum) == (4, 0.1, 0.5, ["q_proj", "v_proj"], 2, 4)
    assert clca.epochs == 5.0  # set explicitly, kept
    assert apply_preset(TrainConfig()) == TrainConfig()
    assert set(PRESETS) == {"culturespa", "clca"}


def test_clca_preset_builds_the_papers_lora(tiny_model_dir):
    tc = apply_preset(TrainConfig(preset="clca"))
    model = make_lora_model(load_base_model(tiny_model_dir), tc)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 0.1, 0.5)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("override, field", [
    ("train.preset=qlora", "train.preset"),
    ("train.lora_dropout=1.5", "train.lora_dropout"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.scheduler=exp", "train.scheduler"),
    ("train.mode=continual", "train.continual_first"),
    ("train.deepspeed={zero_optimization: {stage: 4}}", "train.deepspeed.zero_optimization.stage"),
])
def test_bad_train_settings_name_their_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        load_config(None, [override])


def test_zero3_deepspeed_config_gathers_weights_on_save():
    from cm_ray.train.setup import deepspeed_config

    tc = TrainConfig().replace(deepspeed={"zero_optimization": {"stage": 3}}, grad_accum=2)
    ds = deepspeed_config(tc, world_size=2, use_gpu=False)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_batch_size"] == tc.batch_size * 2 * 2 and ds["bf16"]["enabled"] is False
    assert deepspeed_config(TrainConfig(), 1, use_gpu=True)["bf16"]["enabled"] is True
