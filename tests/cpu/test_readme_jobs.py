"""The README's local job submission, run exactly as written: its bash block (parsed out of README.md,
so the two cannot drift) in a fresh shell — no RAY_* variables, the token the demo's Ray left in
~/.ray/auth_token — in a copy of this working tree, with the demo config's synthesis job on vLLM.

python -m pytest tests/cpu/test_readme_jobs.py -q
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def readme_local_jobs() -> str:
    """The README's bash block that submits a job with the demo config."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if "ray job submit" in b and "configs/demo.yaml" in b]
    assert len(found) == 1, f"one README bash block submits a demo job, found {len(found)}"
    return found[0]


def test_the_readme_block_is_a_local_submission_of_the_demo_synthesis():
    block = readme_local_jobs()
    assert re.search(r"^ray job submit .*jobs/synthesize\.py --config configs/demo\.yaml", block, re.M)


def fresh_env(tmp_path: Path) -> dict:
    """A new login shell's environment: none of Ray's variables (no RAY_AUTH_MODE, no address)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "VLLM_")) and k not in ("CM_RAY_DRIVER", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    env["CM_RAY_VENV"] = str(BIN.parent)
    env["CM_RAY_LOCAL_DIR"] = str(tmp_path / "ray_local")  # the helper's pid file and log
    return env


def test_readme_local_ray_job_submit_runs_the_demo_synthesis(tmp_path):
    block = readme_local_jobs()
    # After the demo: its local Ray left a token (made here when this machine never ran one).
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True,
                       env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, timeout=120)
    # A checkout of this working tree (the job's --working-dir, and its $PWD root).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    checkout = tmp_path / "cm_ray"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (checkout / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, checkout / f)
    env = fresh_env(tmp_path)
    try:
        r = subprocess.run(["bash", "-e", "-c", block], cwd=checkout, env=env, capture_output=True,
                           text=True, timeout=1500)
    finally:
        subprocess.run(["bash", "scripts/ray_local.sh", "stop"], cwd=checkout, env=env,
                       capture_output=True, timeout=120)
    out = r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode == 0, out
    assert "succeeded" in r.stdout, out

    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(str(checkout / "artifacts" / "demo"))
    for stage in ("queries", "search", "synthesize"):
        assert store.read_manifest(stage)["complete"], stage
    summary = store.read_json("synth", "summary.json")
    assert set(summary["per_culture"]) == {"GB", "CN", "MX"} and summary["partitions"] == 6, summary
    assert all(e["rows_out"] > 0 for e in summary["per_culture"].values()), summary["per_culture"]
