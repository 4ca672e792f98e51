"""Package import stays light; CLI fails clearly.  python -m pytest tests/cpu/test_package.py -v"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "ray", "vllm", "deepspeed", "transformers", "peft"]


def test_import_cm_ray_imports_nothing_heavy():
    code = ("import sys, json, cm_ray, cm_ray.config, cm_ray.cultures, cm_ray.storage, cm_ray.stages, "
            "cm_ray.cli, cm_ray.tasks; print(json.dumps(sorted(m for m in sys.modules)))")
    mods = json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=REPO))
    assert not [m for m in HEAVY if m in mods]


def test_cli_rejects_invalid_config_naming_the_field(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cm_ray", "train", str(REPO / "configs" / "demo.yaml"),
                        "train.lora_r=-1", f"root={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "train.lora_r: must be positive" in r.stderr
