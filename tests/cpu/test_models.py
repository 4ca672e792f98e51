"""Embedded offline models resolve to loadable directories.  python -m pytest tests/cpu/test_models.py -v"""

from pathlib import Path

import pytest

from cm_ray.models import ModelNotFoundError, resolve_model


def test_smollm2_is_converted_once_to_safetensors(smollm2_dir):
    d = Path(smollm2_dir)
    assert (d / "model.safetensors").exists() and (d / "config.json").exists()
    mtime = (d / "model.safetensors").stat().st_mtime
    assert resolve_model("embedded:smollm2-135m-instruct") == smollm2_dir
    assert (d / "model.safetensors").stat().st_mtime == mtime  # reused, not converted again


def test_smollm2_generates_with_its_chat_template(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()


def test_minilm_encoder_embeds():
    from sentence_transformers import SentenceTransformer

    enc = SentenceTransformer(resolve_model("embedded:all-minilm-l6-v2"), device="cpu")
    assert enc.encode(["hello world"]).shape == (1, 384)


def test_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="local directory, an s3:// URI, a hub id"):
        resolve_model(str(tmp_path / "nope" / "x"))
    with pytest.raises(ModelNotFoundError, match="unknown embedded model"):
        resolve_model("embedded:gpt-9")


def test_model_from_s3_is_cached_locally(s3_root, tiny_model_dir, tmp_path):
    from cm_ray.storage import ArtifactStore

    ArtifactStore(s3_root).upload_dir(tiny_model_dir, "models", "tiny")
    local = resolve_model(f"{s3_root}/models/tiny", cache_dir=str(tmp_path))
    assert (Path(local) / "config.json").exists() and str(tmp_path) in local


def test_unopenable_model_names_the_reference_and_the_node(tmp_path):
    import pickle
    import socket

    from cm_ray.models import unreadable

    missing = str(tmp_path / "only-on-the-head" / "smollm2")
    with pytest.raises(ModelNotFoundError) as got:
        resolve_model(missing)
    err = got.value
    assert repr(missing) in str(err) and f"on node {socket.gethostname()}" in str(err)
    # the host, and the Ray node id where this process runs Ray (the suite's shared cluster)
    assert err.ref == missing and err.node.startswith(socket.gethostname())
    back = pickle.loads(pickle.dumps(err))  # as it crosses from a Ray worker to the driver
    assert (str(back), back.ref, back.node) == (str(err), err.ref, err.node)
    record = unreadable(RuntimeError("task failed"), "MX", 4)
    assert record is None  # not a model error: not counted as one
    try:
        try:
            raise err
        except ModelNotFoundError as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as outer:
        record = unreadable(outer, "MX/offensive", 4)
    assert record["kind"] == "unreadable" and (record["key"], record["bad"], record["total"]) == ("MX/offensive", 4, 4)
    assert missing in record["detail"] and "cannot be opened on node" in record["detail"]


def test_resolving_udf_resolves_its_model_where_it_is_built(tmp_path):
    """The constructor of a Ray Data UDF class made ``resolving`` gets the node's path for the
    reference it was given (the reference, not a driver's path, travels to the actor)."""
    from cm_ray.models import resolving

    class ChatTemplateLike:
        def __init__(self, data_column: str, model: str):
            self.data_column, self.model = data_column, model

    cls = resolving(ChatTemplateLike)
    assert cls.__name__ == "ChatTemplateLike"
    (tmp_path / "m").mkdir()
    udf = cls(data_column="__data", model=str(tmp_path / "m"))
    assert udf.model == str((tmp_path / "m").resolve()) and udf.data_column == "__data"
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cls(data_column="d", model=hub).model == hub
    with pytest.raises(ModelNotFoundError, match="embedded:gpt-9.*cannot be opened on node"):
        cls(data_column="d", model="embedded:gpt-9")
