"""Rate limits hold by construction: start slots at least 1/qps apart, after idle gaps and stalls,
across several processes sharing one bucket. Driven by a fake monotonic clock (no wall-clock
spacing, so a loaded machine cannot make these fail).

python -m pytest tests/cpu/test_rate_limit.py -q
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

from cm_ray.http import ProcessRateLimit, SharedRateLimit, TokenBucket

QPS = 20.0
GAP = 1.0 / QPS


class FakeTime:
    """A monotonic clock that only moves when the test says so. ``sleep`` parks the caller until
    the clock passes its wake time; ``advance`` moves time forward waking sleepers in order (an
    event loop that keeps up), ``stall`` jumps forward without waking anyone on the way (a loop
    that was blocked): everything that came due during the stall wakes at the same instant."""

    def __init__(self):
        self.now = 100.0
        self.sleepers: list = []
        self.seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self.sleepers, (self.now + max(0.0, dt), next(self.seq), fut))
        await fut

    async def settle(self) -> None:
        for _ in range(200):  # let every runnable task run until it waits on the fake clock
            await asyncio.sleep(0)

    async def _wake_due(self) -> None:
        while self.sleepers and self.sleepers[0][0] <= self.now:
            heapq.heappop(self.sleepers)[2].set_result(None)
        await self.settle()

    async def advance(self, dt: float) -> None:
        end = self.now + dt
        await self.settle()
        while self.sleepers and self.sleepers[0][0] <= end:
            self.now = max(self.now, self.sleepers[0][0])
            await self._wake_due()
        self.now = end
        await self._wake_due()

    async def stall(self, dt: float) -> None:
        await self.settle()
        self.now += dt
        await self._wake_due()


def assert_spaced(starts: list[float], gap: float = GAP) -> None:
    s = sorted(starts)
    assert len(s) >= 2
    closest = min(b - a for a, b in zip(s, s[1:]))
    assert closest >= gap, f"two starts {closest:.4f} s apart, limit allows {gap:.4f} s"


async def _requester(limit, starts: list, fake: FakeTime, n: int, tag: str) -> None:
    for _ in range(n):
        await limit.acquire()
        starts.append((fake.clock(), tag))


async def test_shared_bucket_spaces_every_start_across_processes_after_idle_and_stall():
    fake = FakeTime()
    bucket = TokenBucket(QPS, clock=fake.clock, sleep=fake.sleep)
    # Three simulated actor processes, each with its own local side of the one bucket and
    # several requests waiting at once.
    procs = [SharedRateLimit(bucket, clock=fake.clock, sleep=fake.sleep) for _ in range(3)]
    starts: list = []

    def launch(n: int) -> list:
        return [asyncio.ensure_future(_requester(p, starts, fake, n, f"p{i}"))
                for i, p in enumerate(procs) for _ in range(4)]

    tasks = launch(2)  # 24 requests at once
    await fake.advance(0.3)
    await fake.stall(0.5)  # the loop was blocked; every slot that came due wakes together
    await fake.advance(3.0)
    assert all(t.done() for t in tasks) and len(starts) == 24
    await fake.advance(10.0)  # idle: a token bucket with capacity > 1 would fill up here
    tasks = launch(1)  # 12 more at once after the idle gap
    await fake.advance(0.12)
    await fake.stall(2.0)
    await fake.advance(2.0)
    assert all(t.done() for t in tasks) and len(starts) == 36
    times = [t for t, _ in starts]
    assert_spaced(times)
    assert {tag for _, tag in starts} == {"p0", "p1", "p2"}  # every process got slots
    # And the limit is not starving anyone: outside the stalls, starts come at the full rate.
    first = sorted(times)[:6]
    assert first[-1] - first[0] == pytest.approx(5 * GAP, abs=1e-4)


async def test_process_limit_has_no_burst_after_idle_or_stall():
    fake = FakeTime()
    limit = ProcessRateLimit(QPS, clock=fake.clock, sleep=fake.sleep)
    starts: list = []
    tasks = [asyncio.ensure_future(_requester(limit, starts, fake, 3, "x")) for _ in range(5)]
    await fake.advance(0.2)
    await fake.stall(1.0)
    await fake.advance(5.0)  # finishes, then sits idle
    tasks.append(asyncio.ensure_future(_requester(limit, starts, fake, 4, "y")))
    tasks.append(asyncio.ensure_future(_requester(limit, starts, fake, 4, "y")))
    await fake.stall(0.01)
    await fake.advance(1.0)
    assert all(t.done() for t in tasks) and len(starts) == 23
    assert_spaced([t for t, _ in starts])


async def test_grants_that_reach_a_process_together_still_start_spaced():
    # The bucket granted slots 1/qps apart, but this process saw them all at once (its loop was
    # stalled while they were delivered): the local gate must not let them start together.
    fake = FakeTime()

    class DeliveredTogether:
        """A bucket whose grants all arrive at one instant (delivery delayed by a stall)."""

        def get_rate(self) -> float:
            return QPS

        async def acquire(self) -> float:
            return fake.clock()

    limit = SharedRateLimit(DeliveredTogether(), clock=fake.clock, sleep=fake.sleep)
    starts: list = []
    tasks = [asyncio.ensure_future(_requester(limit, starts, fake, 1, "z")) for _ in range(6)]
    await fake.advance(1.0)
    assert all(t.done() for t in tasks) and len(starts) == 6
    assert_spaced([t for t, _ in starts])


async def test_reconfigured_rate_applies_from_the_latest_grant():
    fake = FakeTime()
    bucket = TokenBucket(10.0, clock=fake.clock, sleep=fake.sleep)
    t0 = await bucket.acquire()
    bucket.configure(2.0)
    task = asyncio.ensure_future(bucket.acquire())
    await fake.advance(0.4)
    assert not task.done()
    await fake.advance(0.2)
    assert task.done() and task.result() - t0 == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="rate must be > 0"):
        bucket.configure(0)


def test_openai_replicas_take_slots_from_one_bucket_not_a_split_share():
    """Replicas given the cluster bucket pace on it at the full rate; without one, each process
    gets qps / replicas (then starts of different replicas may coincide)."""
    from cm_ray.config import load_config
    from cm_ray.generation.openai_client import OpenAIEngine

    s = load_config(None, ["synthesis.engine=openai", "synthesis.openai.qps=20",
                           "synthesis.concurrency=4"]).synthesis
    bucket = TokenBucket(20)
    shared = OpenAIEngine.from_synthesis(s, "m", replicas=4, bucket=bucket)
    assert isinstance(shared.limiter, SharedRateLimit) and shared.limiter.bucket is bucket
    split = OpenAIEngine.from_synthesis(s, "m", replicas=4)
    assert isinstance(split.limiter, ProcessRateLimit) and split.qps == 5
