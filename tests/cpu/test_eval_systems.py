"""The five evaluated systems on a tiny model with tiny PEFT adapters, and the evaluate stage.

python -m pytest tests/cpu/test_eval_systems.py -q
"""

import json

import pytest

from cm_ray.artifacts import culture_system_prompt
from cm_ray.config import load_config
from cm_ray.eval import systems as S
from cm_ray.storage import ArtifactStore

CULTURES = ["GB", "CN", "MX"]


def _save_adapter(base_dir: str, out: str, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    # init_lora_weights=False: random A and B, so each adapter really changes the outputs.
    peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
    peft.save_pretrained(out)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_model_dir):
    """A run root with adapters for GB, CN, MX and _joint (as the train stage lays them out)."""
    root = tmp_path_factory.mktemp("run")
    for i, name in enumerate([*CULTURES, "_joint"]):
        _save_adapter(tiny_model_dir, str(root / "adapters" / name), seed=i)
    return root


@pytest.fixture(scope="module")
def model(run_root, tiny_model_dir):
    return S.EvalModel(tiny_model_dir, {n: str(run_root / "adapters" / n) for n in [*CULTURES, "_joint"]})


CONV = [{"role": "system", "content": "You are a person from Mexico."},
        {"role": "user", "content": "How important is family? 1. Very 2. Rather 3. Not very"}]


def test_cached_scoring_equals_full_sequence_logprob(model):
    import torch

    choices = ["1", "2", "3", "10", "not_offensive"]
    got = model.score([CONV], [choices], adapter="MX")[0]
    prompt = model.prompt_ids(CONV)
    with model.using("MX"), torch.inference_mode():
        for opt, score in zip(choices, got):
            cont = model.tok(opt, add_special_tokens=False)["input_ids"] + [model.tok.eos_token_id]
            lp = torch.log_softmax(model.lm(input_ids=torch.tensor([prompt + cont])).logits[0], -1)
            want = sum(float(lp[len(prompt) - 1 + j, cont[j]]) for j in range(len(cont)))
            assert score == pytest.approx(want, abs=1e-3)


def test_adapters_change_answers_and_base_is_the_plain_model(model, tiny_model_dir):
    base = model.score([CONV], [["1", "2", "3"]], None)[0]
    gb = model.score([CONV], [["1", "2", "3"]], "GB")[0]
    cn = model.score([CONV], [["1", "2", "3"]], "CN")[0]
    assert gb != pytest.approx(base) and gb != pytest.approx(cn)
    plain = S.EvalModel(tiny_model_dir)
    assert plain.score([CONV], [["1", "2", "3"]])[0] == pytest.approx(base, abs=1e-4)
    texts = model.generate([CONV, CONV[1:]], "CN", max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_routes_per_system():
    texts = ["q1", "q2"]
    assert S.plan_routes("base", "MX", texts, CULTURES) == [S.Route(None, None)] * 2
    prompted = S.plan_routes("prompted", "MX", texts, CULTURES)[0]
    assert prompted.adapter is None and "Mexico" in prompted.system
    # Per-culture adapters of the culturemanager recipe were trained without a system prompt.
    assert S.plan_routes("oracle", "MX", texts, CULTURES)[0] == S.Route("MX", None)
    assert S.plan_routes("oracle", "MX", texts, CULTURES, recipe="culturespa")[0] == \
        S.Route("MX", culture_system_prompt("MX"))  # culturespa rows carry the culture prompt
    no_mx = S.plan_routes("oracle", "MX", texts, ["GB", "CN"])[0]  # MX trained nothing: base model
    assert no_mx == S.Route(None, None)
    joint = S.plan_routes("joint", "MX", texts, CULTURES)[0]  # the prompt the joint adapter trained with
    assert joint == S.Route("_joint", culture_system_prompt("MX")) and "Mexico" in joint.system


def test_the_router_reads_only_what_a_user_sends():
    """No evaluation-added prompt (nor the true culture's name) ever reaches the router."""
    texts = ["What do people eat for breakfast?", "¿Qué se come en el desayuno?"]
    seen, meta = [], []

    def router(reqs, metadata=None):
        seen.extend(reqs)
        meta.append(metadata)
        return [("CN", 0.9), ("none", 0.2)]

    cm = S.plan_routes("culturemanager", "MX", texts, CULTURES, router)
    assert seen == texts and meta == [None]
    assert cm == [S.Route("CN", None), S.Route(None, None)]  # misroute kept; "none" -> base model
    seen.clear()
    loc = S.plan_routes("culturemanager_locale", "MX", texts, CULTURES, router, recipe="culturespa")
    assert seen == texts and meta[-1] == [{"language": "es"}] * 2
    # The routed adapter is asked with the prompt of the culture it was routed to, not the true one.
    assert loc[0] == S.Route("CN", culture_system_prompt("CN"))
    for system in S.SYSTEMS:
        for r in S.plan_routes(system, "MX", texts, CULTURES, router):
            assert r.system is None or system in ("prompted", "joint")


def test_missing_artifacts_give_reasons():
    assert "adapters/_joint" in S.missing_artifact("joint", CULTURES, CULTURES, None)
    assert "router" in S.missing_artifact("culturemanager", CULTURES, CULTURES, None)
    assert S.missing_artifact("oracle", CULTURES, ["_joint"], None)
    assert S.missing_artifact("oracle", CULTURES, CULTURES, None) is None
    assert S.missing_artifact("base", CULTURES, [], None) is None


def test_evaluate_without_data_says_so(tmp_path):
    from cm_ray.eval.evaluate import run_evaluate

    cfg = load_config("configs/demo.yaml", [f"root={tmp_path}", f"evaluate.data_dir={tmp_path / 'missing'}"])
    out = run_evaluate(cfg, ArtifactStore(cfg.root))
    assert out["status"] == "no_data" and "no evaluation data found" in out["headline"]
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_evaluate_writes_tables_plots_and_router_confusion(shared_data, run_root, tiny_model_dir, tmp_path):
    """Every system and benchmark on real data, with a real (MiniLM) router trained on the spot."""
    import shutil

    from cm_ray.eval.evaluate import run_evaluate
    from cm_ray.router.model import Encoder, train_router

    root = tmp_path / "run"
    shutil.copytree(run_root / "adapters", root / "adapters", ignore=shutil.ignore_patterns("_joint"))
    store = ArtifactStore(str(root))
    pairs = [(t, c) for c, ts in {"GB": ["a pint at the pub", "queue at the tube"],
                                  "CN": ["春节吃饺子", "在中国喝茶"],
                                  "MX": ["tacos al pastor en México", "el día de muertos"]}.items()
             for t in ts for _ in range(3)]
    router, _ = train_router(pairs, pairs, Encoder("embedded:all-minilm-l6-v2"), threshold=0.0)
    router.save(store, "router")
    cfg = load_config("configs/demo.yaml", [
        f"root={root}", f"models.generator={tiny_model_dir}", f"evaluate.data_dir={shared_data}",
        "evaluate.max_questions=3", "evaluate.bootstrap=50", "evaluate.max_new_tokens=4"])
    out = run_evaluate(cfg, store)
    assert list(out["skipped_systems"]) == ["joint"]
    assert "adapters/_joint" in out["skipped_systems"]["joint"]
    res = json.loads((root / "eval" / "results.json").read_text())
    got = {(r["benchmark"], r["culture"], r["system"], r["metric"]) for r in res["rows"]}
    for c in CULTURES:
        for s in ["base", "prompted", "culturemanager", "culturemanager_locale", "oracle"]:
            for b, m in [("wvs", "alignment_score"), ("wvs", "one_minus_jsd"), ("wvs", "kl"),
                         ("wvs", "individual_accuracy"), ("wvs", "majority_accuracy"),
                         ("culture_tasks", "macro_f1"), ("blend", "accuracy")]:
                assert (b, c, s, m) in got
    for r in res["rows"]:
        assert r["n"] == 3 or r["benchmark"] == "router"
        assert r["ci_low"] <= r["value"] + 1e-9 and r["value"] <= r["ci_high"] + 1e-9
        if r["metric"] == "alignment_score":
            assert 0 <= r["value"] <= 100
    conf = res["confusion"]
    assert [sum(row) for row in conf["matrix"]] == [3, 6, 6] and conf["labels"][-1] == "none"
    md = (root / "eval" / "results.md").read_text()
    assert "### wvs: alignment_score" in md and "system `joint` skipped" in md and "[" in md
    assert "router cost (oracle - culturemanager)" in md
    for png in ["wvs.png", "culture_tasks.png", "blend.png", "router_confusion.png"]:
        assert (root / "eval" / png).read_bytes()[:4] == b"\x89PNG"
