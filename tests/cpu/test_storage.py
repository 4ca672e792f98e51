"""Artifact store on a local path and on a real S3 server (moto) on 127.0.0.1.

python -m pytest tests/cpu/test_storage.py -v
"""

import pytest

from cm_ray.storage import ArtifactStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "root"))
    return ArtifactStore(request.getfixturevalue("s3_root"))


def test_json_and_table_round_trip(store):
    store.write_json({"a": 1}, "manifests", "x.json")
    assert store.read_json("manifests", "x.json") == {"a": 1}
    rows = [{"culture": "MX", "text": "hola", "n": 1}, {"culture": "GB", "text": "hi", "n": 2}]
    store.write_table(rows, "synth", "culture=MX", "part-0.parquet")
    got = store.read_rows("synth")
    assert [r["text"] for r in got] == ["hola", "hi"] and got[0]["culture"] == "MX"
    assert store.exists("synth", "culture=MX") and not store.exists("nope")
    assert store.listdir("synth") == ["culture=MX"]


def test_directory_upload_download(store, tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    store.upload_dir(src, "adapters", "MX")
    assert store.files("adapters", "MX") == ["adapter_config.json", "adapter_model.safetensors"]
    out = store.download_dir(tmp_path / "back", "adapters", "MX")
    assert (out / "adapter_model.safetensors").read_bytes() == b"\x00" * 1000


def test_manifest_helpers(store):
    assert store.read_manifest("search") is None
    store.write_manifest("search", {"complete": True, "rows": 3})
    assert store.read_manifest("search")["rows"] == 3
    assert store.uri("a", "b").endswith("/a/b")


def test_read_table_skips_non_parquet_and_private_files(store):
    store.write_table([{"x": 1}], "synth", "culture=MX", "task=survey", "part-0.parquet")
    store.write_json({"rows": 1}, "synth", "summary.json")
    store.write_table([{"x": 99}], "synth", "_stats", "part-0.parquet")
    rows = store.read_rows("synth")
    assert rows == [{"x": 1, "culture": "MX", "task": "survey"}]
    assert store.read_rows("synth", "culture=MX", "task=survey", "part-0.parquet") == [{"x": 1}]


@pytest.mark.parametrize("damage", [b'{"complete": tr', b"", b'"a string"', b"\xff\xfe\x00"])
def test_a_manifest_that_does_not_parse_is_an_error_naming_it(store, damage):
    from cm_ray.storage import UnreadableRecord

    store.write_bytes(damage, "manifests", "search.json")
    with pytest.raises(UnreadableRecord, match=r"manifests/search\.json: unreadable manifest") as e:
        store.read_manifest("search")
    assert e.value.uri == store.uri("manifests", "search.json")
    assert store.read_bytes("manifests", "search.json") == damage  # left as it was
