"""A driver's Ray goes with it: a ``cm-ray`` process that started its own local Ray (``ray.init()``
through ``ray_utils.init_ray``) is SIGKILLed mid-stage, and every process of that Ray — GCS,
raylet, dashboard, the raylet's agents, workers — is gone within a bounded wait (Ray's own fate
sharing left the agents up for a minute or more).

python -m pytest tests/cpu/test_driver_cleanup.py -q
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
from aiohttp import web

from tests.conftest import REPO, LoopbackServer, wait_for

pytestmark = pytest.mark.slow


class StalledSearx(LoopbackServer):
    """A SearXNG endpoint that takes every search and never answers: the stage stays in flight."""

    METHOD, PATH, URL_SUFFIX = "GET", "/search", "/search"

    def __init__(self):
        self.asked = threading.Event()
        super().__init__()

    async def handle(self, request):
        self.asked.set()
        await asyncio.sleep(3600)
        return web.json_response({"results": []})


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def test_sigkilled_driver_takes_its_local_ray_with_it(tmp_path):
    searx = StalledSearx()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "CM_RAY_DRIVER"}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "cm_ray", "synthesize", "configs/demo.yaml", f"root={tmp_path / 'run'}",
         "search.provider=searxng", f"search.endpoint={searx.url}", "search.qps=null",
         "cultures=[GB]", "tasks=[offensive]"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # A search request reached the endpoint: the driver's Ray is up and a worker is searching.
        wait_for(lambda: searx.asked.is_set() or driver.poll() is not None, 600, "the search stage")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        procs = psutil.Process(driver.pid).children(recursive=True)
        names = " ".join(cmdline(p) for p in procs)
        for part in ("gcs_server", "raylet", "dashboard", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert part in names, f"{part} is not among the driver's processes: {names[:2000]}"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        # The agents alone used to wait 60 s on the dead GCS before exiting.
        try:
            wait_for(lambda: all(gone(p) for p in procs), 30, "the driver's Ray processes to exit", every=0.5)
        except TimeoutError:
            pass
        left = [(p, cmdline(p)[:120]) for p in procs if not gone(p)]
        for p, _ in left:  # never leave them behind on this machine
            p.kill()
        assert not left, f"alive 30 s after the driver was killed: {[(p.pid, c) for p, c in left]}"
    finally:
        if driver.poll() is None:
            driver.kill()
        searx.close()
        log.close()
