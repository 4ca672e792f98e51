"""Evaluate base, prompted, joint, culturemanager and oracle on the public culture benchmarks.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/paper.yaml [key=value ...]

The same entry point and flags as `cm-ray evaluate` (see README: Running on a cluster).
"""

import sys

from cm_ray.cli import job_main

if __name__ == "__main__":  # vLLM's engine runs in a child process: keep the guard
    sys.exit(job_main("evaluate"))
