"""Starting or joining Ray the same way in every stage, job and test, and handing secrets to
workers without Ray displaying them.

Secrets never go into ``runtime_env`` (Ray shows it in its dashboard, state API and job info):
workers read credentials from their own environment (a local cluster started by ``ray.init``
inherits the driver's; cluster nodes get them from the node environment or instance role), and
where only the driver holds a key (e.g. set after Ray started), ``share_secrets`` puts a small
``Secrets`` object into the object store and the worker dereferences the handle it is given.
A forwarded URL loses any ``user:password@`` in it (``AWS_ENDPOINT_URL=http://key:secret@host``):
boto3 drops it and pyarrow cannot parse it, so workers get the bare endpoint and, like the
driver, take their S3 credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a role.

A local cluster that ``init_ray`` starts ends with its driver, however the driver ends: Ray's own
fate sharing (``PR_SET_PDEATHSIG`` on GCS, raylet and dashboard) ends the core at once, but the
raylet's agents then spend 60 s reporting to the dead GCS and anything a worker started may stay.
So every process of that cluster carries ``CM_RAY_DRIVER=<tag>`` in its environment (set before
``ray.init``, inherited by everything Ray starts) and a watchdog (``python -m cm_ray.ray_utils``,
in its own session) notes the driver's descendants while it lives (a ``ray::`` process retitles
itself over its environment), then SIGKILLs those and every process with the tag.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")  # scheme://user:pass@ (to the last @)

# Environment that every Ray worker of ours needs: one OpenMP thread per worker (a ZeRO-2 step went
# from 0.9 s to 0.03 s on 2 cores), the model cache, and the S3 endpoint when one is set.
# No credentials here (AWS keys come from the node's environment or role, never runtime_env).
_FORWARDED = ["CM_RAY_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
              "AWS_DEFAULT_REGION", "TORCH_EXTENSIONS_DIR",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_CPU_OMP_THREADS_BIND",
              "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE"]
_SECRET_WORDS = frozenset({"KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS"})


def is_secret_name(name: str) -> bool:
    """True for an environment variable that holds a credential (never forwarded): one of its
    ``_``-separated words is KEY, SECRET, TOKEN, PASSWORD, ... (TOKENIZERS_PARALLELISM is not)."""
    return not _SECRET_WORDS.isdisjoint(name.upper().split("_"))


class Secrets:
    """Secret values by environment-variable name; prints, reprs and logs as the names only.
    ``get`` falls back to this process's environment (a worker's own credentials)."""

    def __init__(self, values: dict[str, str] | None = None):
        self._values = {k: v for k, v in (values or {}).items() if v}

    def get(self, name: str | None) -> str | None:
        if not name:
            return None
        return self._values.get(name) or os.environ.get(name)

    def values(self) -> list[str]:
        return list(self._values.values())

    def __repr__(self) -> str:
        return f"Secrets({', '.join(sorted(self._values))})"

    __str__ = __repr__


class SecretsHandle:
    """What a worker is given: an object-store reference to a ``Secrets`` (nested in this object,
    so Ray neither inlines the value into task/actor arguments nor resolves it early); the worker
    calls ``resolve()``. Shown anywhere, it is an object id."""

    def __init__(self, ref):
        self.ref = ref

    def resolve(self) -> Secrets:
        import ray

        return ray.get(self.ref)

    def __repr__(self) -> str:
        return "SecretsHandle(<object ref>)"


def share_secrets(names: Iterable[str | None]) -> SecretsHandle:
    """The driver's values of the variables ``names`` (those set), put into the object store."""
    import ray

    return SecretsHandle(ray.put(Secrets({n: os.environ.get(n, "") for n in names if n})))


def resolve_secrets(secrets: "SecretsHandle | Secrets | None") -> Secrets:
    """A worker's ``Secrets``: from the handle it was given, else its own environment only."""
    if isinstance(secrets, SecretsHandle):
        return secrets.resolve()
    return secrets if isinstance(secrets, Secrets) else Secrets()


def without_userinfo(url: str) -> tuple[str, bool]:
    """``url`` without the ``user:password@`` of its authority, and whether it had one."""
    bare = _USERINFO.sub(r"\1", url)
    return bare, bare != url


def worker_env() -> dict[str, str]:
    """``runtime_env`` variables for our workers: settings only, never a credential (a URL's
    embedded ``user:password@`` is dropped, with a warning that names the variable only)."""
    env = {k: os.environ[k] for k in _FORWARDED if k in os.environ and not is_secret_name(k)}
    for name, value in list(env.items()):
        env[name], had = without_userinfo(value)
        if had:
            log.warning("%s has credentials in its URL; they are not forwarded to Ray workers (boto3 "
                        "ignores them, pyarrow fails on them): workers get the bare endpoint and need "
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (node environment or role)", name)
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


_STARTED_LOCAL = False
DRIVER_TAG = "CM_RAY_DRIVER"  # environment variable every process of a driver's local cluster carries
_WATCHDOG: subprocess.Popen | None = None


def owns_cluster() -> bool:
    """True when init_ray started a local cluster that ends with this process (no address)."""
    return _STARTED_LOCAL


def init_ray(cfg=None, **overrides) -> None:
    """``ray.init`` once: join ``cfg.ray.address`` / ``RAY_ADDRESS`` or start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    rcfg = getattr(cfg, "ray", None)
    address = getattr(rcfg, "address", None) or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        num_cpus = getattr(rcfg, "num_cpus", None)
        if num_cpus is None:
            # Logical CPUs above the 2 physical cores keep a Data stage from starving while Train
            # workers hold theirs (seen as a "backpressured" hang with num_cpus=2).
            num_cpus = max(4, os.cpu_count() or 1)
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = getattr(rcfg, "include_dashboard", True)
    kwargs.update(overrides)
    if "address" not in kwargs:
        start_watchdog()
    ray.init(**kwargs)
    global _STARTED_LOCAL
    _STARTED_LOCAL = "address" not in kwargs


def start_watchdog() -> subprocess.Popen | None:
    """Tag this process's environment (what Ray's processes inherit) and start the watchdog that
    kills every tagged process once this process is gone (module docstring). Once per process;
    Linux only (elsewhere Ray's reaper process is all there is)."""
    global _WATCHDOG
    if _WATCHDOG is not None or not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return _WATCHDOG
    tag = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != DRIVER_TAG}
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    _WATCHDOG = subprocess.Popen([sys.executable, "-m", "cm_ray.ray_utils", str(os.getpid()), tag],
                                 env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 start_new_session=True)  # a Ctrl-C to the driver's group spares it
    os.environ[DRIVER_TAG] = tag
    return _WATCHDOG


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment has ``CM_RAY_DRIVER=<tag>`` (zombies have none)."""
    marker, found = f"{DRIVER_TAG}={tag}".encode(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if marker in Path("/proc", name, "environ").read_bytes().split(b"\0"):
                    found.append(int(name))
            except OSError:  # gone, or not ours to read
                continue
    return found


def _watch(driver_pid: int, tag: str, rounds: int = 40, every_s: float = 1.0) -> None:
    """The watchdog: until ``driver_pid`` exits, note its descendants every ``every_s`` (Ray's
    agents and workers retitle themselves over their environment, so the tag alone misses them);
    then kill those still alive and what carries ``tag``, until none is left."""
    import select

    import psutil

    seen: dict[int, float] = {}
    try:
        fd = os.pidfd_open(driver_pid)
        driver = psutil.Process(driver_pid)
        while not select.select([fd], [], [], every_s)[0]:
            for p in driver.children(recursive=True):
                try:
                    if p.pid != os.getpid():  # the watchdog is the driver's child too
                        seen.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    continue
    except (ProcessLookupError, psutil.Error):
        pass  # the driver is gone
    for _ in range(rounds):
        left = [pid for pid in tagged_pids(tag) if pid not in seen]
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.Error:
                continue
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)


def quiet_data_progress() -> None:
    """No Ray Data progress bars from this process's datasets (a train trial's token rows): Ray
    forwards them to the driver, where a finished trial's bar was redrawn under every later log
    line; the stage prints its own progress line per trial."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


if __name__ == "__main__":  # the watchdog of start_watchdog: python -m cm_ray.ray_utils DRIVER_PID TAG
    _watch(int(sys.argv[1]), sys.argv[2])
