"""Atomic publish of adapters and the router (issue 18, defect 7 + requirement 4), local and on a
real S3 server (moto): a new version is written beside the current one, then one pointer file
switches; a crash at any point before the switch leaves the previous version what readers get.

python -m pytest tests/cpu/test_publish.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cm_ray import artifacts
from cm_ray.publish import LOCK
from cm_ray.storage import POINTER, VERSIONS, ArtifactStore
from tests.cpu.test_serve_adapters import _item, corrupt_adapter, make_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "root"))
    return ArtifactStore(request.getfixturevalue("s3_root"))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pub")
    out = {}
    for seed, tag in enumerate(["v1", "v2", "v3"]):
        d = make_adapter(tiny_model_dir, root / tag, seed)
        (d / "metrics.json").write_text(json.dumps({"tag": tag}))
        out[tag] = d
    return out


def _current(store, name="MX"):
    got = artifacts.published_adapter(store, name)
    assert got is not None
    return got


def _tag(store, name="MX") -> str:
    return store.read_json(*_current(store, name)[0], "metrics.json")["tag"]


def _generate_with(store, tiny_model_dir, tmp_path, name="MX") -> str:
    """Load the resolved adapter with the real pool (plain PEFT layout) and generate."""
    from cm_ray.serve.pool import AdapterPool

    parts = _current(store, name)[0]
    local = store.local_path(*parts) or store.download_dir(tmp_path / f"dl-{time.time_ns()}", *parts)
    assert sorted(p.name for p in Path(local).iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.json"]
    pool = AdapterPool(tiny_model_dir)
    return pool.generate([_item("Hello there", pool.load(str(local), name), 6)])[0]["text"]


def test_versions_pointer_and_garbage_collection(store, adapters):
    v1 = store.publish_dir(adapters["v1"], *artifacts.adapter_dir("MX"))
    assert _current(store) == ((*artifacts.adapter_dir("MX"), VERSIONS, v1), v1) and _tag(store) == "v1"
    assert store.publish_dir(adapters["v1"], *artifacts.adapter_dir("MX")) == v1  # same content, same id
    v2 = store.publish_dir(adapters["v2"], *artifacts.adapter_dir("MX"))
    assert v2 != v1 and _tag(store) == "v2"
    assert sorted(store.listdir(*artifacts.adapter_dir("MX"), VERSIONS)) == sorted([v1, v2])  # previous kept
    v3 = store.publish_dir(adapters["v3"], *artifacts.adapter_dir("MX"))
    assert sorted(store.listdir(*artifacts.adapter_dir("MX"), VERSIONS)) == sorted([v2, v3])
    ptr = store.read_pointer(*artifacts.adapter_dir("MX"))
    assert ptr["version"] == v3 and ptr["previous"] == v2
    assert ptr["files"] == store.file_sizes(*artifacts.adapter_dir("MX"), VERSIONS, v3)
    assert set(store.listdir(*artifacts.adapter_dir("MX"))) - {LOCK} == {POINTER, VERSIONS}


def test_a_dir_written_in_place_is_read_until_a_version_replaces_it(store, adapters):
    store.upload_dir(adapters["v1"], *artifacts.adapter_dir("GB"))  # the layout before versioning
    assert _current(store, "GB") == (artifacts.adapter_dir("GB"), None) and _tag(store, "GB") == "v1"
    store.publish_dir(adapters["v2"], *artifacts.adapter_dir("GB"))
    assert _tag(store, "GB") == "v2" and store.exists(*artifacts.adapter_dir("GB"), "metrics.json")
    store.publish_dir(adapters["v3"], *artifacts.adapter_dir("GB"))  # in-place files were previous
    assert _tag(store, "GB") == "v3"
    assert set(store.listdir(*artifacts.adapter_dir("GB"))) - {LOCK} == {POINTER, VERSIONS}


def test_a_pointer_that_does_not_parse_names_nothing_and_collects_nothing(store, adapters):
    v1 = store.publish_dir(adapters["v1"], *artifacts.adapter_dir("CN"))
    v2 = store.publish_dir(adapters["v2"], *artifacts.adapter_dir("CN"))
    store.write_bytes(b"{not json", *artifacts.adapter_dir("CN"), POINTER)
    assert artifacts.published_adapter(store, "CN") is None
    v3 = store.publish_dir(adapters["v3"], *artifacts.adapter_dir("CN"))  # what the old pointer named is unknown
    assert _tag(store, "CN") == "v3"
    assert sorted(store.listdir(*artifacts.adapter_dir("CN"), VERSIONS)) == sorted([v1, v2, v3])


# -- concurrent publishers of one directory (real processes) ----------------------------------

RACING_PUBLISHER = textwrap.dedent("""
    import json, sys
    from cm_ray import artifacts
    from cm_ray.storage import ArtifactStore
    store, sources = ArtifactStore(sys.argv[1]), sys.argv[2:]
    for i in range(6):  # publish, then check what the pointer names is complete, six times over
        store.publish_dir(sources[i % len(sources)], "adapters", "MX")
        ptr = store.read_pointer("adapters", "MX")
        got = store.file_sizes("adapters", "MX", "versions", ptr["version"])
        assert got == ptr["files"] or store.read_pointer("adapters", "MX") != ptr, (ptr, got)
    print("OK", flush=True)
""")


def _race(root: str, sources: list[list[str]], pre: str = "") -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", pre + RACING_PUBLISHER, root, *srcs], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for srcs in sources]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]


def test_concurrent_publishers_never_leave_the_pointer_naming_a_collected_version(store, adapters):
    """Three processes publish the same adapter at once, each cycling through versions; a pause
    between copying a version and switching to it (where the race was) is made wide on purpose."""
    widen = textwrap.dedent("""
        import time, pyarrow.fs as pafs
        _copy = pafs.copy_files
        def copy_files(*a, **kw):
            _copy(*a, **kw)
            time.sleep(0.3)  # another publisher switches and collects here
        pafs.copy_files = copy_files
    """)
    tags = [str(adapters[t]) for t in ("v1", "v2", "v3")]
    runs = _race(store.root, [tags, tags[1:] + tags[:1], tags[2:] + tags[:2]], widen)
    for r in runs:
        assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
    ptr = store.read_pointer(*artifacts.adapter_dir("MX"))
    current = store.file_sizes(*artifacts.adapter_dir("MX"), VERSIONS, ptr["version"])
    assert current == ptr["files"] and _tag(store) in ("v1", "v2", "v3")
    kept = set(store.listdir(*artifacts.adapter_dir("MX"), VERSIONS))
    assert {ptr["version"], ptr["previous"]} <= kept  # collection never deletes what the pointer names
    assert not store.is_s3 or not store.exists(*artifacts.adapter_dir("MX"), LOCK)  # released


def test_an_s3_lock_left_by_a_dead_publisher_is_taken_over_after_its_lease(s3_root, adapters):
    store = ArtifactStore(s3_root)
    store.write_json({"owner": "dead", "expires": 0}, *artifacts.adapter_dir("MX"), LOCK)
    v1 = store.publish_dir(adapters["v1"], *artifacts.adapter_dir("MX"))
    assert _current(store)[1] == v1 and not store.exists(*artifacts.adapter_dir("MX"), LOCK)


def test_a_held_lock_times_out_naming_it(store):
    from cm_ray.publish import publish_lock

    now = [0.0]
    with publish_lock(store, "adapters", "GB"):
        if store.is_s3:  # the same process again: the object exists, its lease has not run out
            with pytest.raises(TimeoutError, match="current.json.lock: held by another publisher"):
                with publish_lock(store, "adapters", "GB", timeout_s=5, clock=lambda: now.__setitem__(0, now[0] + 1) or now[0]):
                    pass
        else:
            with pytest.raises(TimeoutError, match="current.json.lock: held by another publisher"):
                with publish_lock(store, "adapters", "GB", timeout_s=0.2):
                    pass


def test_threads_writing_one_path_do_not_share_a_temporary_file(tmp_path):
    """Two threads of one process (one pid) writing the same file at once."""
    from concurrent.futures import ThreadPoolExecutor

    store = ArtifactStore(str(tmp_path / "root"))
    payloads = [json.dumps({"writer": i, "pad": "x" * 200_000}).encode() for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda data: [store.write_bytes(data, "manifests", "x.json") for _ in range(20)], payloads))
    assert store.read_bytes("manifests", "x.json") in payloads
    assert store.listdir("manifests") == ["x.json"]  # no temporary left behind


@pytest.mark.parametrize("crash", ["before-switch", "mid-copy"])
def test_failure_during_publish_keeps_the_previous_version(store, adapters, tiny_model_dir, tmp_path,
                                                            monkeypatch, crash):
    import pyarrow.fs as pafs

    store.publish_dir(adapters["v1"], *artifacts.adapter_dir("MX"))
    before = _generate_with(store, tiny_model_dir, tmp_path)
    real_copy, real_write = pafs.copy_files, ArtifactStore.write_json

    def write_json(self, obj, *parts):
        if parts[-1] == POINTER:
            raise OSError("injected crash before the pointer switch")
        return real_write(self, obj, *parts)

    def copy_one_file_then_fail(src, dest, **kw):  # a crash after part of the version is written
        first = sorted(p for p in Path(src).iterdir())[-1]
        with open(first, "rb") as f, store.fs.open_output_stream(f"{dest}/{first.name}") as out:
            out.write(f.read()[:1000])
        raise OSError("injected crash in the middle of the copy")

    if crash == "before-switch":
        monkeypatch.setattr(ArtifactStore, "write_json", write_json)
    else:
        monkeypatch.setattr(pafs, "copy_files", copy_one_file_then_fail)
    with pytest.raises(OSError, match="injected"):
        store.publish_dir(adapters["v2"], *artifacts.adapter_dir("MX"))
    monkeypatch.setattr(ArtifactStore, "write_json", real_write)
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    assert _tag(store) == "v1" and len(store.listdir(*artifacts.adapter_dir("MX"), VERSIONS)) == 2
    assert _generate_with(store, tiny_model_dir, tmp_path) == before
    # publishing again completes the interrupted version (a partial copy is detected and redone)
    v2 = store.publish_dir(adapters["v2"], *artifacts.adapter_dir("MX"))
    assert _tag(store) == "v2" and _generate_with(store, tiny_model_dir, tmp_path) != before
    assert store.read_pointer(*artifacts.adapter_dir("MX"))["files"] == store.file_sizes(
        *artifacts.adapter_dir("MX"), VERSIONS, v2)


KILLED_PUBLISHER = textwrap.dedent("""
    import sys, time, pathlib, pyarrow.fs as pafs
    from cm_ray.storage import ArtifactStore
    real, mid_copy = pafs.copy_files, sys.argv[3] == "COPYING"
    def copy_files(src, dest, **kw):  # the same copy, file by file, with a pause to be killed in
        for i, f in enumerate(sorted(pathlib.Path(src).iterdir())):
            real(str(f), f"{dest}/{f.name}", **kw)
            if mid_copy:
                print("COPYING", flush=True)  # one file of the new version written, the rest not
                time.sleep(60)
        print("COPIED", flush=True)
        time.sleep(60)  # the window between the version written and the pointer switch
    pafs.copy_files = copy_files
    ArtifactStore(sys.argv[1]).publish_dir(sys.argv[2], "adapters", "MX")
    print("PUBLISHED", flush=True)
""")


@pytest.mark.parametrize("wait_for", ["COPYING", "COPIED"], ids=["mid-copy", "before-switch"])
def test_sigkill_during_publish_keeps_the_previous_version(store, adapters, tiny_model_dir, tmp_path,
                                                           wait_for):
    """A real process killed with SIGKILL while it publishes a large-ish adapter."""
    store.publish_dir(adapters["v1"], *artifacts.adapter_dir("MX"))
    before = _generate_with(store, tiny_model_dir, tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    for f in adapters["v2"].iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    with open(big / "optimizer_state.bin", "wb") as f:  # ~96 MB: the copy takes a while
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISHER, store.root, str(big), wait_for],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines = []
        while (line := proc.stdout.readline().strip()) != wait_for:
            assert line, f"publisher ended before {wait_for}: {lines}"
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _tag(store) == "v1", "the killed publish switched the pointer"
    mx = artifacts.adapter_dir("MX")
    new = [v for v in store.listdir(*mx, VERSIONS) if v != _current(store)[1]]
    written = store.file_sizes(*mx, VERSIONS, new[0]) if new else {}
    full = {f.name: f.stat().st_size for f in big.iterdir()}
    assert len(written) == (len(full) if wait_for == "COPIED" else 1), (written, full)  # killed there
    assert _generate_with(store, tiny_model_dir, tmp_path) == before
    # the next publish of the same content repairs the interrupted version and switches
    v2 = store.publish_dir(big, *artifacts.adapter_dir("MX"))
    assert _tag(store) == "v2"
    assert store.file_sizes(*artifacts.adapter_dir("MX"), VERSIONS, v2)["optimizer_state.bin"] == 96 << 20


def test_router_publish_is_one_version(store, tmp_path, monkeypatch):
    import numpy as np

    from cm_ray.router.model import CultureRouter, load_router

    enc = lambda texts: np.ones((len(texts), 3), np.float32)  # noqa: E731
    old = CultureRouter(["GB", "MX"], np.eye(2, 3), np.zeros(2), encoder=enc)
    v1 = old.save(store, *artifacts.router_dir(), metrics={"accuracy": 0.5})
    assert artifacts.published_router(store)[1] == v1
    assert sorted(store.listdir(*artifacts.router_dir(), VERSIONS, v1)) == [
        "head.npz", "metrics.json", "router.json"]
    new = CultureRouter(["CN", "GB", "MX"], np.eye(3), np.zeros(3), encoder=enc)
    monkeypatch.setattr(ArtifactStore, "write_json", lambda self, obj, *parts: (_ for _ in ()).throw(
        OSError("injected crash before the pointer switch")))
    with pytest.raises(OSError, match="injected"):
        new.save(store, *artifacts.router_dir(), metrics={"accuracy": 0.9})
    monkeypatch.undo()
    assert load_router(store, encoder=enc).cultures == ["GB", "MX"]
    new.save(store, *artifacts.router_dir(), metrics={"accuracy": 0.9})
    assert load_router(store, encoder=enc).cultures == ["CN", "GB", "MX"]
    assert store.read_json(*artifacts.published_router(store)[0], "metrics.json") == {"accuracy": 0.9}


# -- what serving and training read -----------------------------------------------------------

def test_adapter_ids_list_only_complete_well_formed_versions(store, adapters, tiny_model_dir, tmp_path):
    from cm_ray.serve.adapters import adapter_ids, adapter_problem
    from cm_ray.train.tune import adapter_complete

    store.publish_dir(adapters["v1"], *artifacts.adapter_dir("GB"))
    store.publish_dir(corrupt_adapter(tiny_model_dir, tmp_path / "BR", "garbage"), *artifacts.adapter_dir("BR"))
    cut = tmp_path / "CN"  # a truncated weights file: the header parses, the data is short
    cut.mkdir()
    for f in adapters["v1"].iterdir():
        (cut / f.name).write_bytes(f.read_bytes()[: -100 if f.suffix == ".safetensors" else None])
    store.publish_dir(cut, *artifacts.adapter_dir("CN"))
    assert adapter_ids(store) == ["GB"]
    assert "safetensors" in adapter_problem(store, _current(store, "BR")[0])
    assert adapter_complete(store, "GB") and not adapter_complete(store, "MX")
    # tampering with a published version after the fact is seen too (sizes differ from the pointer)
    store.publish_dir(adapters["v2"], *artifacts.adapter_dir("MX"))
    store.write_bytes(b"{}", *_current(store, "MX")[0], "extra.json")
    assert "MX" not in adapter_ids(store) and "GB" in adapter_ids(store)


def test_a_broken_version_is_not_retried_until_republished(store, adapters, tiny_model_dir, tmp_path):
    """Issue 18 defect 2 through the replica's loader: repeated requests for a corrupt adapter
    load it once, answer 422 naming it, keep the model bounded; a new version is loaded."""
    from cm_ray.serve.adapters import AdapterServer, adapter_ids
    from cm_ray.serve.api import ApiError
    from cm_ray.serve.pool import AdapterPool

    bad = corrupt_adapter(tiny_model_dir, tmp_path / "BR", "rank")  # well-formed, fails in PEFT
    store.publish_dir(adapters["v1"], *artifacts.adapter_dir("GB"))
    store.publish_dir(bad, *artifacts.adapter_dir("BR"))
    server = AdapterServer.func_or_class.__new__(AdapterServer.func_or_class)
    server.store, server.pool, server.model_dir = store, AdapterPool(tiny_model_dir), tiny_model_dir
    loads = []
    real_load = server.pool.load
    server.pool.load = lambda path, culture: loads.append(culture) or real_load(path, culture)

    async def go():
        gb = await server._load_adapter("GB")
        for _ in range(20):
            with pytest.raises(ApiError) as e:
                await server._load_adapter("BR")
            assert e.value.status == 422 and "'BR'" in str(e.value.body())
        return gb

    gb = asyncio.run(go())
    # The corrupt version is refused by the check before any load (the pool never sees it).
    assert loads == ["GB"] and server.pool.loaded == [gb.name]
    assert "BR" not in adapter_ids(store) and "GB" in adapter_ids(store)
    store.publish_dir(adapters["v2"], *artifacts.adapter_dir("BR"))  # a fixed version
    br = asyncio.run(server._load_adapter("BR"))
    assert br.version == _current(store, "BR")[1] and loads == ["GB", "BR"]
    assert "BR" in adapter_ids(store) and sorted(server.pool.loaded) == sorted([gb.name, br.name])


def test_eval_and_training_read_the_current_version(store, adapters):
    from cm_ray.eval.systems import cleanup, load_adapters

    store.publish_dir(adapters["v1"], *artifacts.adapter_dir("GB"))
    store.publish_dir(adapters["v2"], *artifacts.adapter_dir("GB"))
    store.publish_dir(adapters["v3"], *artifacts.adapter_dir("_joint"))
    found, tmp = load_adapters(store, ["GB", "MX", "_joint"])
    try:
        assert sorted(found) == ["GB", "_joint"]
        assert json.loads(Path(found["GB"], "metrics.json").read_text())["tag"] == "v2"
        assert json.loads(Path(found["_joint"], "metrics.json").read_text())["tag"] == "v3"
    finally:
        cleanup(tmp)


def test_a_broken_dir_written_in_place_is_not_retried_until_it_changes(tmp_path, tiny_model_dir, adapters):
    from cm_ray.serve.adapters import AdapterServer
    from cm_ray.serve.api import ApiError
    from cm_ray.serve.pool import AdapterPool

    store = ArtifactStore(str(tmp_path / "root"))
    store.upload_dir(corrupt_adapter(tiny_model_dir, tmp_path / "CN", "garbage"), *artifacts.adapter_dir("CN"))
    server = AdapterServer.func_or_class.__new__(AdapterServer.func_or_class)
    server.store, server.pool, server.model_dir = store, AdapterPool(tiny_model_dir), tiny_model_dir
    loads = []
    real_load = server.pool.load
    server.pool.load = lambda path, culture: loads.append(culture) or real_load(path, culture)

    async def fail_times(n):
        for _ in range(n):
            with pytest.raises(ApiError, match="'CN'.*in place"):
                await server._load_adapter("CN")

    asyncio.run(fail_times(5))
    assert loads == [] and server.pool.loaded == []  # refused by the check, never loaded
    store.upload_dir(adapters["v1"], *artifacts.adapter_dir("CN"))  # fixed by hand, in place
    cn = asyncio.run(server._load_adapter("CN"))
    assert loads == ["CN"] and server.pool.loaded == [cn.name] and cn.version is None
