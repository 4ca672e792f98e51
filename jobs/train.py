"""Train one LoRA adapter per culture as parallel Ray Tune trials (Ray Train + DeepSpeed).

    ray job submit --working-dir . -- python jobs/train.py --config configs/paper.yaml [key=value ...]

The same entry point and flags as `cm-ray train` (see README: Running on a cluster).
"""

import sys

from cm_ray.cli import job_main

if __name__ == "__main__":  # vLLM's engine runs in a child process: keep the guard
    sys.exit(job_main("train"))
