"""Fit the router if missing and deploy the Serve app; it stays deployed (--smoke-only: shut down).

    ray job submit --working-dir . -- python jobs/serve.py --config configs/paper.yaml [key=value ...]

The same entry point and flags as `cm-ray serve` (see README: Running on a cluster).
"""

import sys

from cm_ray.cli import job_main

if __name__ == "__main__":  # vLLM's engine runs in a child process: keep the guard
    sys.exit(job_main("serve"))
