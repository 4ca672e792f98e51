"""scripts/install.sh puts the CPU build of torch first on any machine, not only where a local +cpu
wheel happens to be served: PyPI's ``torch==2.13.0`` is the CUDA build; the ``+cpu`` build comes
from PyTorch's CPU wheel index (``CM_RAY_TORCH_INDEX`` overrides its URL).

Two PEP 503 indexes on the local filesystem stand in for them: "PyPI" serves a ``torch-2.13.0``
wheel marked cuda, the CPU index a ``torch-2.13.0+cpu`` wheel marked cpu. pip runs with no
configuration of this machine (no local wheel directory, no constraints).

python -m pytest tests/cpu/test_install.py -q
"""

from __future__ import annotations

import hashlib
import base64
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _wheel(index: Path, version: str, build: str) -> None:
    """A minimal valid wheel of a package called torch whose module says which build it is."""
    d = index / "simple" / "torch"
    d.mkdir(parents=True, exist_ok=True)
    name = f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": f"BUILD = {build!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    with zipfile.ZipFile(d / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text.encode())}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    (d / "index.html").write_text(f'<html><body><a href="{name}">{name}</a></body></html>')


def _clean_pip_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", **extra)
    return env


def _installed_build(venv: Path) -> str:
    out = subprocess.check_output([str(venv / "bin" / "python"), "-c", "import torch; print(torch.BUILD)"])
    return out.decode().strip()


def test_install_takes_the_cpu_torch_build_from_the_cpu_index_not_pypis_cuda_build(tmp_path):
    pypi, cpu = tmp_path / "pypi", tmp_path / "cpu-index"
    _wheel(pypi, "2.13.0", "cuda")
    _wheel(cpu, "2.13.0+cpu", "cpu")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_clean_pip_env())
    env = _clean_pip_env(CM_RAY_VENV=str(venv), PIP_INDEX_URL=(pypi / "simple").as_uri(),
                         CM_RAY_TORCH_INDEX=(cpu / "simple").as_uri())

    # What the script did before: the bare pin resolves to PyPI's (CUDA) build.
    bare = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"], env=env,
                          capture_output=True, text=True)
    assert bare.returncode == 0, bare.stderr
    assert _installed_build(venv) == "cuda"

    r = subprocess.run(["bash", "scripts/install.sh", "--torch-only"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _installed_build(venv) == "cpu"
