"""A stopped training job resumes: `ray job submit` of the train job (packed trials, as in
configs/demo.yaml), `ray job stop` once it has written checkpoints, then the same submit again.

python -m pytest tests/cpu/test_jobs_resume.py -q

The second job names its Ray Train run after the adapter's recorded attempt id (the fingerprint
record keeps it while the adapter is unfinished), so it picks up the first job's last checkpoint:
the published adapter says it resumed from that step, under the first job's run name, and ran
only the remaining steps.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import RayNodes, wait_for
from tests.cpu.test_train_pack import write_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_endpoint):
    nodes = RayNodes(tmp_path_factory.mktemp("head"))
    try:
        yield nodes.start_head(num_cpus=4)
    finally:
        nodes.stop()


def _checkpoints(root):
    return sorted((root / "checkpoints").glob("pack0-*/checkpoint_*"))


def test_a_stopped_train_job_resumes_from_its_last_checkpoint(ray_head, tiny_model_dir, tmp_path):
    from cm_ray import artifacts as A
    from cm_ray.storage import ArtifactStore

    root = tmp_path / "run"
    store = ArtifactStore(str(root))
    write_rows(store, "GB", 160)
    overrides = [f"root={root}", f"models.base={tiny_model_dir}", "cultures=[GB]", "tasks=[offensive]",
                 "train.joint_baseline=false", "train.target_modules=[all-linear]", "train.batch_size=1",
                 "train.epochs=8", "train.max_seq_len=128", "train.checkpoint_every_steps=100"]
    job = ["--working-dir", ".", "--", "python", "jobs/train.py", "--config", "configs/demo.yaml", *overrides]
    sub = f"train-{os.getpid()}"
    r = ray_head.cli("job", "submit", "--no-wait", "--submission-id", sub, *job, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wait_for(lambda: len(_checkpoints(root)) >= 1, 600, "a checkpoint of the first job", every=0.2)
    r = ray_head.cli("job", "stop", sub, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    status = ray_head.cli("job", "status", sub, timeout=60).stdout
    assert "stopped" in status.lower(), status[-2000:] + ray_head.cli("job", "logs", sub, timeout=60).stdout[-3000:]
    time.sleep(3)  # its Train worker goes with the driver
    assert A.published_adapter(store, "GB") is None  # stopped before the end
    first = _checkpoints(root)
    run_name = first[-1].parent.name

    r = ray_head.cli("job", "submit", "--submission-id", f"{sub}-again", *job, timeout=900)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    where, _ = A.published_adapter(store, "GB")
    m = store.read_json(*where, "metrics.json")
    assert m["run_name"] == run_name  # the first job's run, continued
    assert len(m["resumed_from"]) == 1 and m["resumed_from"][0] >= 100 and m["resumed_from"][0] % 100 == 0, m
    assert m["resumed_from"][0] < m["total_steps"]
    # One loss curve from step 1 to the end: the first job's steps restored, the rest trained.
    assert [s for s, _ in m["loss_curve"]] == list(range(1, m["total_steps"] + 1))
