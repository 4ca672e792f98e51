"""Train the culture router (if missing) and deploy the Serve app: router + multiplexed adapters.

    ray job submit --working-dir . -- python jobs/serve.py --config configs/paper.yaml [key=value ...]

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
    parser.add_argument("--keep-serving", action="store_true", default=True,
                        help="leave the app deployed after the smoke request (default for jobs)")
    parser.add_argument("--smoke-only", dest="keep_serving", action="store_false",
                        help="deploy, answer one request, shut down")
    args = parser.parse_args()
    argv = ["serve", args.config, *args.overrides] + (["--force"] if args.force else [])
    argv += ["--keep-serving"] if args.keep_serving else []
    sys.exit(main(argv))
