"""``python -m cm_ray.node_secrets SECRET_ID``: a node's credentials, from a secret store into the
environment of ``ray start`` (never into ``runtime_env``, which Ray displays).

The secret is a JSON object of environment-variable names and values in AWS Secrets Manager
(``HF_TOKEN`` for a gated hub model, ``BRAVE_API_KEY``/``SERPER_API_KEY``/... for the search
providers, ``CM_RAY_API_KEY`` for the Serve app). Printed as ``export NAME='value'`` lines that
cluster.yaml writes to a file only its user can read and sources before ``ray start``, so every Ray
worker on the node inherits them; KubeRay manifests get the same names from a Kubernetes Secret
(``envFrom``). ``AWS_ENDPOINT_URL`` points boto3 at another Secrets Manager (the rehearsal's moto).
"""

from __future__ import annotations

import json
import re
import shlex
import sys

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def export_lines(secret: dict) -> str:
    """``export NAME='value'`` per entry; a name that is no shell variable name is an error."""
    if not isinstance(secret, dict):
        raise ValueError("the secret must be a JSON object of NAME: value")
    bad = [k for k in secret if not _NAME.match(str(k))]
    if bad:
        raise ValueError(f"not environment-variable names: {', '.join(map(str, bad))}")
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(secret.items()))


def fetch(secret_id: str) -> dict:
    import boto3

    value = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"]
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"secret {secret_id}: not a JSON object") from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cm_ray.node_secrets SECRET_ID", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(export_lines(fetch(args[0])))
    except Exception as e:  # one line, never the values
        print(f"cm_ray.node_secrets: {args[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
