"""Train one LoRA adapter per culture as parallel Ray Tune trials (Ray Train + DeepSpeed).

    ray job submit --working-dir . -- python jobs/train.py --config configs/paper.yaml [key=value ...]

Idempotent: a stage whose outputs exist in the artifact root is skipped (pass --force to redo it);
an interrupted run resumes. Use an absolute or s3:// `root` under `ray job submit`: the job runs
in a copy of the working dir. Runtime env: the cluster image has cm_ray's dependencies
(see cluster.yaml); add env vars with --runtime-env-json '{"env_vars": {"SERPER_API_KEY": "..."}}'.
"""

import sys

from cm_ray.cli import job_main

if __name__ == "__main__":  # vLLM's engine runs in a child process: keep the guard
    sys.exit(job_main("train", __doc__))
