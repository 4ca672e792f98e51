"""Culture router: training, calibration, plain-data artifact, metadata, the `route` stage.

python -m pytest tests/cpu/test_router.py -q
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cm_ray import artifacts
from cm_ray.artifacts import NONE
from cm_ray.config import load_config
from cm_ray.router.model import Encoder, load_router, train_router
from cm_ray.router.stage import run_router_training
from cm_ray.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[2]

# Small in-language, culture-flavoured texts (also used by the serve tests).
TEXTS = {
    "GB": [
        "I queued for the bus in the rain and then had a cup of tea with biscuits.",
        "Is it rude to skip the queue at the post office in London?",
        "We watched the football at the pub on Saturday and had fish and chips.",
        "My mum always makes a Sunday roast with Yorkshire pudding.",
        "Should I tip the waiter at a restaurant in Manchester?",
        "The weather in Scotland is grey and drizzly again today.",
        "Guy Fawkes night is on the fifth of November with bonfires and fireworks.",
        "I'm knackered after the commute on the Tube this morning.",
        "The village fete had a cake stall and a tombola.",
        "Cricket at Lord's is a proper summer tradition.",
        "We had a cream tea with scones, jam and clotted cream in Devon.",
        "The NHS waiting list for my GP appointment is two weeks.",
        "Boxing Day is for leftovers, long walks and the football.",
        "She apologised when I bumped into her, which is very British.",
    ],
    "CN": [
        "春节的时候我们全家一起包饺子，看春晚。",
        "在中国，送礼物的时候不能送钟，这是为什么？",
        "中秋节我们会吃月饼，一起赏月。",
        "长辈给晚辈发红包是过年的习俗。",
        "在北京坐地铁上班，早高峰人非常多。",
        "请问在饭桌上筷子可以插在米饭里吗？",
        "我奶奶每天早上都去公园打太极拳。",
        "端午节要吃粽子，还有赛龙舟比赛。",
        "考大学的高考对学生来说压力非常大。",
        "我们周末去茶馆喝茶聊天。",
        "清明节的时候人们会去扫墓祭祖。",
        "上海的小笼包非常有名，你吃过吗？",
        "结婚的时候新娘常常穿红色的衣服。",
        "他用微信支付买了一杯奶茶。",
    ],
    "MX": [
        "En el Día de Muertos ponemos una ofrenda con pan de muerto y cempasúchil.",
        "¿Es de mala educación llegar puntual a una fiesta en la Ciudad de México?",
        "Mi abuela prepara tamales y atole para la Candelaria.",
        "Fuimos a comer tacos al pastor después del partido.",
        "En las posadas rompemos la piñata y cantamos villancicos.",
        "El mariachi tocó las mañanitas en el cumpleaños de mi tía.",
        "Para la quinceañera de mi prima hubo vals y chambelanes.",
        "¿Cuánta propina se deja en un restaurante en Guadalajara?",
        "El tianguis de los domingos vende fruta, ropa y antojitos.",
        "Celebramos el grito de independencia el quince de septiembre.",
        "Mi familia come chiles en nogada en septiembre.",
        "La lucha libre en la Arena México es muy divertida.",
        "Compramos una rosca de reyes el seis de enero.",
        "El metro de la Ciudad de México cuesta cinco pesos.",
    ],
}


def split_pairs(n_train: int = 10):
    """(train, validation) lists of (text, culture)."""
    train = [(t, c) for c, ts in TEXTS.items() for t in ts[:n_train]]
    val = [(t, c) for c, ts in TEXTS.items() for t in ts[n_train:]]
    return train, val


@pytest.fixture(scope="module")
def encoder():
    return Encoder("embedded:all-minilm-l6-v2")


@pytest.fixture(scope="module")
def trained(encoder):
    train, val = split_pairs()
    return train_router(train, val, encoder, threshold=0.4)


def test_router_learns_cultures_and_reports_confusion(trained):
    router, metrics = trained
    assert router.cultures == ["CN", "GB", "MX"]
    assert metrics["accuracy"] >= 0.8, metrics
    assert metrics["n_validation"] == 12
    # every validation input lands in exactly one confusion cell (a culture or "none")
    assert sum(sum(row.values()) for row in metrics["confusion"].values()) == 12
    assert set(metrics["confusion"]["MX"]) == {"CN", "GB", "MX", NONE}
    assert metrics["temperature"] > 0 and 0 <= metrics["ece"] <= 1


def test_predictions_are_calibrated_probabilities(trained):
    router, _ = trained
    texts = ["Vamos a comer pozole en la fiesta patria.", "我们一起去吃火锅吧。",
             "Fancy a cuppa and a chat down the pub?"]
    probs = router.probabilities(texts)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [c for c, _ in router.predict(texts)] == ["MX", "CN", "GB"]
    assert all(0.4 <= p <= 1.0 for _, p in router.predict(texts))


def test_low_confidence_routes_to_base_model(trained):
    router, _ = trained
    text = "12345 67890"
    culture, conf = router.predict([text])[0]
    assert conf < 0.9  # nothing culture-specific in it
    strict = load_router(_saved(router, router.encoder), encoder=router.encoder, threshold=conf + 0.05)
    assert strict.predict([text])[0] == (NONE, conf)


def test_declared_country_wins_and_language_reweights(trained):
    router, _ = trained
    text = "What do people eat at a birthday party?"
    assert router.predict([text], [{"country": "Mexico"}])[0] == ("MX", 1.0)
    assert router.predict([text], [{"country": "MEX"}])[0] == ("MX", 1.0)
    # a declared country the router has no culture for is ignored, not an error
    assert router.predict([text], [{"country": "Atlantis"}])[0][0] in {"CN", "GB", "MX", NONE}
    p_plain = router.probabilities([text])[0]
    p_zh = router.probabilities([text], [{"language": "zh"}])[0]
    i = router.cultures.index("CN")
    assert p_zh[i] > p_plain[i]


def test_artifact_is_plain_npz_and_json_and_reloads_identically(trained, encoder, tmp_path):
    router, _ = trained
    store = ArtifactStore(str(tmp_path))
    version = router.save(store, "router")
    # the pointer, the versions and (local roots) the publish lock file beside the pointer
    assert sorted(set(store.listdir("router")) - {"current.json.lock"}) == ["current.json", "versions"]
    assert sorted(store.listdir("router", "versions", version)) == ["head.npz", "router.json"]
    with np.load(tmp_path / "router" / "versions" / version / "head.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"weight", "bias"}
    again = load_router(store, encoder=encoder)
    texts = [t for t, _ in split_pairs()[1]]
    assert again.predict(texts) == router.predict(texts)
    assert load_router(tmp_path / "router", encoder=encoder).cultures == router.cultures


def test_missing_router_raises_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cm-ray route"):
        load_router(ArtifactStore(str(tmp_path)))


def test_route_stage_trains_from_synth_rows_on_s3(s3_root, ray_local):
    store = ArtifactStore(s3_root)
    for culture, texts in TEXTS.items():
        rows = [{"id": f"{culture}-{i}", "culture": culture, "task": "offensive",
                 "split": "validation" if i >= 10 else "train", "input": t, "output": "0",
                 "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "0"}]}
                for i, t in enumerate(texts)]
        store.write_table(rows, "synth", f"culture={culture}", "task=offensive", "part-0.parquet")
    store.write_json({"rows_out": 42}, "synth", "summary.json")  # lives beside the partitions
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"root={s3_root}"])
    summary = run_router_training(cfg, store)
    assert summary["cultures"] == 3 and summary["n_validation"] == 12
    assert summary["accuracy"] >= 0.8 and "router accuracy" in summary["headline"]
    metrics = store.read_json(*artifacts.published_router(store)[0], "metrics.json")  # same version
    assert metrics["n_train"] == 30 and "confusion" in metrics
    assert load_router(store).predict(["Comimos tacos en el tianguis."])[0][0] == "MX"


def test_router_module_imports_without_ray():
    code = ("import sys, cm_ray.router.model, cm_ray.router.stage; "
            "print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True)
    assert out.split() == ["False", "False"]


def test_a_culture_with_one_row_still_trains_with_in_sample_validation(encoder):
    from cm_ray.router.model import train_router

    pairs = [("Fancy a cuppa and a biscuit?", "GB"), ("It's chucking it down, innit", "GB"),
             ("¿Vamos por unos tacos al pastor?", "MX")]
    router, metrics = train_router(pairs, [], encoder)
    assert router.cultures == ["GB", "MX"] and metrics["n_validation"] == 3
    assert "in-sample" in metrics["note"]
    assert router.predict(["¿Unos tacos al pastor?"])[0][0] in {"MX", "none"}
    assert router.probabilities(["Cheers mate"]).shape == (1, 2)


def test_a_culture_with_zero_rows_is_routed_on_language_and_mention(encoder):
    """KR and DE have no training rows: language ID + CLDR shares and country names route them."""
    train, val = split_pairs()
    router, metrics = train_router(train, val, encoder, cultures=["CN", "DE", "GB", "KR", "MX"])
    assert router.cultures == ["CN", "DE", "GB", "KR", "MX"] and router.content_cultures == ["CN", "GB", "MX"]
    assert metrics["zero_row_cultures"] == ["DE", "KR"]
    got = router.route(["한국에서 설날에는 무엇을 먹나요?", "Was isst man an Weihnachten zum Abendessen?",
                        "What do people in Germany eat at Christmas?"])
    assert [g["culture"] for g in got] == ["KR", "DE", "DE"]
    assert [g["evidence"] for g in got] == ["language", "language", "mention"]
    assert all(g["probability"] >= 0.4 for g in got)
    calls = []
    router._encoder = lambda texts: calls.append(list(texts)) or encoder(texts)
    router._emb_cache.clear()
    router.route(["한국에서 설날에는 무엇을 먹나요?", "春节的时候我们全家一起包饺子。", "Fancy a cuppa?"])
    # language alone decides ko and zh; for English, DE (no rows; CLDR: 26% speak English) is a
    # contender the head never saw, so the head cannot arbitrate: no encoder call at all
    assert calls == []
    again = load_router(_saved(router, encoder), encoder=encoder)  # the evidence survives a reload
    assert again.route(["한국에서 설날에는 무엇을 먹나요?"]) == got[:1]


def _saved(router, encoder):
    import tempfile

    d = tempfile.mkdtemp(prefix="router-")
    router.save(ArtifactStore(d), "router")
    return ArtifactStore(d)


def test_overrides_win_over_every_evidence(encoder):
    train, val = split_pairs()
    router, _ = train_router(train, val, encoder, cultures=["CN", "DE", "GB", "MX"])
    zh = "春节的时候我们全家一起包饺子。"
    assert router.route([zh])[0]["culture"] == "CN"
    assert router.route([zh], [{"country": "DE"}])[0] == {"culture": "DE", "probability": 1.0,
                                                          "evidence": "metadata_country"}
    # a declared language is evidence, not an override: it moves probability towards its speakers
    text = "What do people eat at a birthday party?"
    p, p_de = router.probabilities([text])[0], router.probabilities([text], [{"language": "de"}])[0]
    assert p_de[router.cultures.index("DE")] > p[router.cultures.index("DE")]
    from cm_ray.serve.api import ChatRequest
    from cm_ray.serve.ingress import pick_culture

    req = ChatRequest(model="auto", messages=[{"role": "user", "content": zh}])
    have = lambda c: True  # noqa: E731
    assert pick_culture(req, "MX", have, lambda t, m: router.predict([t], m and [m])[0])["culture"] == "MX"
    assert pick_culture(req, None, have, lambda t, m: router.predict([t], m and [m])[0])["culture"] == "CN"


def test_calibration_is_sane_on_held_out_rows(encoder):
    """The head's temperature minimises the held-out NLL; probabilities sum to one; confident
    language evidence gives confident, correct picks, and a text with none stays uncertain."""
    from cm_ray.router.model import _softmax, fit_temperature

    train, val = split_pairs(8)
    router, metrics = train_router(train, val, encoder)
    texts, y = [t for t, _ in val], np.array([router.content_cultures.index(c) for _, c in val])
    z = router.logits(encoder(texts))
    nll = lambda t: float(-np.log(_softmax(z / t)[np.arange(len(y)), y]).mean())  # noqa: E731
    assert abs(fit_temperature(z, y) - router.content_temperature) < 1e-6
    assert nll(router.content_temperature) <= min(nll(1.0), nll(4.0)) + 1e-6
    np.testing.assert_allclose(router.probabilities(texts).sum(axis=1), 1.0, atol=1e-6)
    assert 0 <= metrics["ece"] <= 1 and sum(metrics["decided_by"].values()) == len(val)
    lang_only, _ = train_router(train, val, encoder, cultures=["CN", "DE", "GB", "MX"], evidence=("language",))
    p = lang_only.probabilities(["Heute gehen wir mit der ganzen Familie in den Wald spazieren.", "!!! ???"])
    assert p[0].argmax() == lang_only.cultures.index("DE") and p[0].max() > 0.8
    np.testing.assert_allclose(p[1], 0.25, atol=1e-6)  # no letters, no evidence: uniform


def test_the_content_head_arbitrates_only_between_cultures_it_has_rows_for(encoder):
    """A head trained on CN/GB/MX rows knows nothing of ES: between MX and ES it could only favour
    MX, so it is not consulted there (no encoder call); among cultures with rows it is."""
    from cm_ray.router import evidence as E

    train, val = split_pairs()
    with_es, _ = train_router(train, val, encoder, cultures=["CN", "ES", "GB", "MX"])
    known, _ = train_router(train, val, encoder, cultures=["CN", "GB", "MX"])
    text = "¿Vamos por unos tacos al pastor?"
    for router, expect in ((with_es, []), (known, [[text]])):
        calls = []
        router._encoder = lambda texts, calls=calls: calls.append(list(texts)) or encoder(texts)
        router._emb_cache.clear()
        router.route([text])
        assert calls == expect
    # the rule on known scores: culture 2 has no rows and is within the head's reach of the top
    pre = np.log(np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 1e-6], [0.98, 0.01, 0.01]]))
    assert E.content_applies(pre, [0, 1]).tolist() == [False, True, False]


def test_variety_words_separate_cultures_that_share_a_language(encoder):
    """Spanish from Spain vs Mexico: language ID and CLDR shares favour MX for any Spanish text;
    vosotros forms and Peninsular slang move it to ES, Mexican slang keeps it at MX."""
    train, val = split_pairs()
    router, _ = train_router(train, val, encoder, cultures=["CN", "ES", "GB", "MX"])
    got = router.route(["¿Vosotros sabéis a qué hora abren? Joder, qué frío hace.",
                        "No mames wey, qué pinche frío hace hoy.",
                        "¿A qué hora abre la tienda mañana?"])
    assert [g["culture"] for g in got[:2]] == ["ES", "MX"]
    assert got[0]["evidence"] == "variety"
    assert got[2]["culture"] in {"MX", "none"}  # no marker: the CLDR shares, nothing else
    from cm_ray.router import evidence as E

    v = E.variety_scores(["Os lo dije: sois unos gilipollas", "Color and favorite", "vos sos"],
                         ["ES", "GB", "MX", "US"])
    assert v[0].tolist()[0] > 0 and v[0].tolist()[2] == 0
    assert v[1].tolist()[3] > 0 and v[1].tolist()[1] == 0
    assert not v[2].any()  # Argentine voseo: no culture of these four
    # The Peninsular present perfect for the recent past vs the Mexican preterite; a Mexican
    # marker beside it cancels it out.
    v = E.variety_scores(["Hoy he comido con mi familia en casa", "Hoy comí con mi familia en casa",
                          "No mames, hoy he comido bien"], ["ES", "MX"])
    assert v[0, 0] > 0 and v[0, 1] == 0
    assert not v[1].any()
    assert v[2, 0] > 0 and v[2, 1] == v[2, 0]


def test_int8_encoder_is_recorded_and_reloaded_with_the_router(encoder, tmp_path):
    """router.encoder_int8: the head is fitted on int8 embeddings and a reloaded router builds the
    same int8 encoder itself (router.json records it), so its probabilities are the same."""
    q = Encoder("embedded:all-minilm-l6-v2", int8=True)
    train, val = split_pairs()
    router, metrics = train_router(train, val, q)
    assert router.encoder_int8 and metrics["accuracy"] >= 0.75
    emb, emb_q = encoder(["Fancy a cuppa?"]), q(["Fancy a cuppa?"])
    assert 0.5 < float(emb @ emb_q.T) < 0.9999  # a different, still close embedding
    router.save(ArtifactStore(str(tmp_path)), "router")
    again = load_router(ArtifactStore(str(tmp_path)))  # builds its own encoder from router.json
    assert again.encoder_int8 and again.encoder.int8
    texts = [t for t, _ in val]
    np.testing.assert_allclose(again.probabilities(texts), router.probabilities(texts), atol=1e-5)
    with pytest.raises(ValueError, match="encoder_int8=True"):  # an fp32 encoder does not fit it
        load_router(ArtifactStore(str(tmp_path)), encoder=encoder)
