"""Bad input through the real ``cm-ray`` entry point: one line naming the file or field, exit code
2, never a traceback (the error boundary of ``cm_ray.cli.main``); YAML alias bombs refused, not
expanded; ``plan`` never contacts a cluster unless given ``--connect``, and then gives up in time.

python -m pytest tests/cpu/test_cli_errors.py -q
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cm_ray import artifacts as A
from cm_ray.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
CM_RAY = shutil.which("cm-ray", path=str(Path(sys.executable).parent)) or shutil.which("cm-ray")
COMMANDS = ["status", "export", "plan", "synthesize"]
BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


def cm_ray(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    assert CM_RAY, "the cm-ray entry point is not installed (pip install -e .)"
    return subprocess.run([CM_RAY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": ""})


def one_line_error(r: subprocess.CompletedProcess, *names: str) -> str:
    """The run failed with exit code 2 and one line on stderr naming every one of ``names``."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _config(tmp_path: Path, body: str = "", name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"name: t\nroot: {tmp_path / 'root'}\ncultures: [GB]\ntasks: [offensive]\n{body}")
    return p


def _args(command: str, tmp_path: Path) -> list[str]:
    return ["--to", str(tmp_path / "out")] if command == "export" else []


@pytest.mark.parametrize("command", COMMANDS)
def test_a_config_that_cannot_be_read_is_one_line_naming_it(command, tmp_path):
    (tmp_path / "adir").mkdir()
    one_line_error(cm_ray(command, str(tmp_path / "adir"), *_args(command, tmp_path)), "adir", "is a directory")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    one_line_error(cm_ray(command, str(latin1), *_args(command, tmp_path)), "latin1.yaml", "not UTF-8")
    one_line_error(cm_ray(command, str(tmp_path / "nope.yaml"), *_args(command, tmp_path)), "nope.yaml", "no such file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: t\ncultures: [GB\n")
    one_line_error(cm_ray(command, str(broken), *_args(command, tmp_path)), "broken.yaml", "line 3")


@pytest.mark.parametrize("command", COMMANDS)
def test_malformed_overrides_and_unknown_tasks_are_one_line_naming_the_field(command, tmp_path):
    cfg = str(_config(tmp_path))
    extra = _args(command, tmp_path)
    one_line_error(cm_ray(command, cfg, "train.lora_r=[1,", *extra), "train.lora_r", "not valid YAML")
    one_line_error(cm_ray(command, cfg, "name.x=1", *extra), "name.x", "name is not a mapping")
    one_line_error(cm_ray(command, cfg, "..=1", *extra), "'..'", "not a dotted key")
    one_line_error(cm_ray(command, cfg, "tasks=[offensive, no_such_task]", *extra), "tasks[1]", "no_such_task")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_yaml_alias_bomb_is_refused_not_expanded(command, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"name: t\nroot: {tmp_path / 'root'}\nextra:\n" + "".join(f"  {ln}\n" for ln in BOMB.splitlines()))
    r = cm_ray(command, str(bomb), *_args(command, tmp_path), timeout=60)  # expanded: 10^9 nodes
    one_line_error(r, "bomb.yaml", "aliases expand it to")
    r = cm_ray(command, str(_config(tmp_path)), "seed=" + "[" * 4000, *_args(command, tmp_path), timeout=60)
    one_line_error(r, "seed")


@pytest.mark.parametrize("command", ["status", "synthesize"])
@pytest.mark.parametrize("record", ["manifest", "fingerprints"])
def test_corrupt_bookkeeping_is_one_line_naming_the_file_and_deletes_nothing(command, record, tmp_path):
    from tests.cpu.test_train_pack import write_rows

    store = ArtifactStore(str(tmp_path / "root"))
    write_rows(store, "GB", 3, task="offensive")
    where = A.manifest_file("queries") if record == "manifest" else A.fingerprints_file("queries")
    store.write_bytes(b'{"complete": tru', *where)
    r = cm_ray(command, str(_config(tmp_path, "search:\n  provider: bm25\n")))
    one_line_error(r, "/".join(where), "unreadable")
    assert store.exists(*A.synth_file("GB", "offensive")) and store.read_bytes(*where) == b'{"complete": tru'


def test_export_of_a_truncated_partition_is_one_line_naming_it(tmp_path):
    from tests.cpu.test_train_pack import write_rows

    store = ArtifactStore(str(tmp_path / "root"))
    write_rows(store, "GB", 3, task="offensive")
    whole = store.read_bytes(*A.synth_file("GB", "offensive"))
    store.write_bytes(whole[:-40], *A.synth_file("GB", "offensive"))
    r = cm_ray("export", str(_config(tmp_path)), "--to", str(tmp_path / "out"))
    one_line_error(r, "culture=GB/task=offensive/part-0.parquet", "unreadable synth partition")
    assert not (tmp_path / "out").exists()


def test_plan_with_a_malformed_cluster_file_is_one_line_naming_it(tmp_path):
    cfg = str(_config(tmp_path))
    bad = tmp_path / "cluster.yaml"
    for text in ("available_node_types: [1, 2\n", "available_node_types: 5\n",
                 "apiVersion: ray.io/v1\nkind: RayCluster\nspec: {headGroupSpec: 3}\n", BOMB):
        bad.write_text(text)
        one_line_error(cm_ray("plan", cfg, "--cluster", str(bad)), "cluster.yaml")
    one_line_error(cm_ray("plan", cfg, "--cluster", str(tmp_path)), str(tmp_path), "is a directory")
    one_line_error(cm_ray("plan", cfg, "ray.cluster_config=" + str(tmp_path / "missing.yaml")), "missing.yaml")


@pytest.fixture
def silent_port():
    """A TCP port that accepts connections and never says anything (a cluster that hangs)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s
    s.close()


def test_plan_never_contacts_the_configured_cluster_unless_asked(silent_port, tmp_path):
    port = silent_port.getsockname()[1]
    cfg = str(_config(tmp_path, f"ray:\n  address: 127.0.0.1:{port}\n"))
    r = cm_ray("plan", cfg)
    assert r.returncode == 0 and f"127.0.0.1:{port} not contacted (--connect plans for it)" in r.stdout, r.stderr
    silent_port.setblocking(False)
    with pytest.raises(BlockingIOError):  # nobody connected
        silent_port.accept()


def test_plan_connect_gives_up_with_a_message(silent_port, tmp_path):
    port = silent_port.getsockname()[1]
    cfg = str(_config(tmp_path, f"ray:\n  address: 127.0.0.1:{port}\n"))
    r = cm_ray("plan", cfg, "--connect", "6", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"cm-ray plan: ray.address 127.0.0.1:{port}: no Ray cluster answered within 6 s" in r.stderr
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    cfg = str(_config(tmp_path, f"ray:\n  address: 127.0.0.1:{closed.getsockname()[1]}\n", "refused.yaml"))
    one_line_error(cm_ray("plan", cfg, "--connect", "5"), "cannot reach it")
    closed.close()
