"""Synthesize task-format cultural training data: LLM search queries, async web search, grounded synthesis.

    ray job submit --working-dir . -- python jobs/synthesize.py --config configs/paper.yaml [key=value ...]

Idempotent: a stage whose outputs exist in the artifact root is skipped (pass --force to redo it);
an interrupted run resumes. Use an absolute or s3:// `root` under `ray job submit`: the job runs
in a copy of the working dir. Runtime env: the cluster image has cm_ray's dependencies
(see cluster.yaml); add env vars with --runtime-env-json '{"env_vars": {"SERPER_API_KEY": "..."}}'.
"""

import argparse
import sys

from cm_ray.cli import main

if __name__ == "__main__":  # vLLM's engine runs in a child process: keep the guard
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lora_r=16")
    parser.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    args = parser.parse_args()
    argv = ["synthesize", args.config, *args.overrides] + (["--force"] if args.force else [])
    sys.exit(main(argv))
