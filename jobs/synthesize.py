"""Synthesize task-format cultural training data (queries, async web search, grounded synthesis).

    ray job submit --working-dir . -- python jobs/synthesize.py --config configs/paper.yaml [key=value ...]

The same entry point and flags as `cm-ray synthesize` (see README: Running on a cluster).
"""

import sys

from cm_ray.cli import job_main

if __name__ == "__main__":  # vLLM's engine runs in a child process: keep the guard
    sys.exit(job_main("synthesize"))
