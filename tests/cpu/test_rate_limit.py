"""Rate limits hold by construction: start slots on a 1/qps schedule that a late grant does not
push back (GCRA with a tolerance of half a slot), never more than a provider's token bucket with
room for 2 allows, after idle gaps and stalls, across several processes sharing one bucket; and
under scheduling jitter (every wake-up late) the full rate is still reached. Driven by a fake
monotonic clock (no wall-clock spacing, so a loaded machine cannot make these fail).

python -m pytest tests/cpu/test_rate_limit.py -q
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random

import pytest

from cm_ray.http import ProcessRateLimit, SharedRateLimit, TokenBucket

QPS = 20.0
GAP = 1.0 / QPS
TOL = 0.5  # TokenBucket's default tolerance, in slots
EPS = 1e-9  # float rounding of sums of intervals


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


def provider_refusals(starts: list[float], rate: float = QPS, room: int = 2) -> int:
    """How many of ``starts`` a provider's token bucket (``rate``/s, capacity ``room``) refuses."""
    tokens, last, refused = float(room), None, 0
    for t in sorted(starts):
        tokens = min(room, tokens + (t - last) * rate) if last is not None else tokens
        last = t
        if tokens >= 1 - EPS:
            tokens -= 1
        else:
            refused += 1
    return refused


def max_in_window(starts: list[float], width: float) -> int:
    """The most starts in any half-open window ``[t, t + width)``."""
    s = sorted(starts)
    return max(sum(1 for u in s[i:] if u < t + width - EPS) for i, t in enumerate(s))


def assert_spaced(starts: list[float], gap: float = GAP * (1 - TOL)) -> None:
    """The GCRA bounds: two starts at least ``(1 - TOL)/qps`` apart, any ``n + 1`` starts span at
    least ``(n - TOL)/qps``, so a provider bucket with room for 2 refuses none, no window of
    ``1/qps`` holds more than 2 starts and no second more than ``qps + 1``."""
    s = sorted(starts)
    assert len(s) >= 2
    closest = min(b - a for a, b in zip(s, s[1:]))
    assert closest >= gap - EPS, f"two starts {closest:.4f} s apart, limit allows {gap:.4f} s"
    for n in (2, 5, 10):
        tight = min(b - a for a, b in zip(s, s[n:])) if len(s) > n else float("inf")
        assert tight >= (n - TOL) * GAP - EPS, f"{n + 1} starts within {tight:.4f} s"
    assert provider_refusals(s) == 0
    assert max_in_window(s, GAP) <= 2 and max_in_window(s, 1.0) <= QPS + 1


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
    # And the limit is not starving anyone: outside the stalls, starts come at the full rate
    # (the first start after idle takes its half slot of tolerance, the rest are a slot apart).
    first = sorted(times)[:6]
    assert first[-1] - first[0] == pytest.approx((5 - TOL) * GAP, abs=1e-4)


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


async def test_reconfigured_rate_applies_from_the_latest_slot():
    fake = FakeTime()
    bucket = TokenBucket(10.0, clock=fake.clock, sleep=fake.sleep)
    t0 = await bucket.acquire()
    bucket.configure(2.0)
    task = asyncio.ensure_future(bucket.acquire())
    await fake.advance(0.4)
    assert not task.done()
    await fake.advance(0.2)
    # t0 came after idle, so its slot was TOL slots of the old rate (0.1 s) before it
    assert task.done() and task.result() - t0 == pytest.approx(0.5 - TOL * 0.1, abs=1e-4)
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


class JitteryTime(FakeTime):
    """Every sleep wakes late, as on a busy machine: 0-40% of a slot, and 2% of them 1.5 slots
    more (a loop blocked for a while)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.rng = random.Random(seed)

    async def sleep(self, dt: float) -> None:
        late = self.rng.uniform(0, 0.4 * GAP) + (1.5 * GAP if self.rng.random() < 0.02 else 0.0)
        await super().sleep(dt + late)


def _rate(starts: list[float]) -> float:
    s = sorted(starts)
    return (len(s) - 1) / (s[-1] - s[0])


async def _run_jittery(make_limits, n_each: int, fake: JitteryTime) -> list[float]:
    starts: list = []
    tasks = [asyncio.ensure_future(_requester(limit, starts, fake, n_each, f"p{i}"))
             for i, limit in enumerate(make_limits()) for _ in range(4)]
    while not all(t.done() for t in tasks):
        await fake.advance(1.0)
    return [t for t, _ in starts]


@pytest.mark.parametrize("shared", [False, True], ids=["process", "shared-3-processes"])
async def test_full_rate_under_scheduling_jitter_without_exceeding_the_limit(shared):
    fake = JitteryTime()
    if shared:
        bucket = TokenBucket(QPS, clock=fake.clock, sleep=fake.sleep)
        make = lambda: [SharedRateLimit(bucket, clock=fake.clock, sleep=fake.sleep) for _ in range(3)]  # noqa: E731
    else:
        make = lambda: [ProcessRateLimit(QPS, clock=fake.clock, sleep=fake.sleep)]  # noqa: E731
    starts = await _run_jittery(make, 200 if not shared else 70, fake)
    assert len(starts) == (800 if not shared else 840)
    assert _rate(starts) >= 0.95 * QPS, f"{_rate(starts) / QPS:.3f} of the limit"
    assert_spaced(starts)


async def test_a_strict_bucket_gives_late_slots_away_under_the_same_jitter():
    # What the capacity-1 bucket did: each late grant pushed the whole schedule back.
    fake = JitteryTime()
    strict = TokenBucket(QPS, tolerance=0.0, clock=fake.clock, sleep=fake.sleep)
    starts = await _run_jittery(lambda: [strict], 200, fake)
    assert _rate(starts) < 0.9 * QPS
    assert_spaced(starts, gap=GAP)
    with pytest.raises(ValueError, match="tolerance must be within"):
        TokenBucket(QPS, tolerance=1.5)


async def test_an_idle_bucket_earns_no_more_than_its_tolerance():
    fake = FakeTime()
    bucket = TokenBucket(QPS, clock=fake.clock, sleep=fake.sleep)
    await bucket.acquire()
    await fake.advance(10.0)  # idle: at most half a slot of catch-up is owed, never a burst
    starts: list = []
    tasks = [asyncio.ensure_future(_requester(bucket, starts, fake, 1, "i")) for _ in range(4)]
    await fake.advance(1.0)
    assert all(t.done() for t in tasks)
    s = sorted(t for t, _ in starts)
    gaps = [b - a for a, b in zip(s, s[1:])]
    assert gaps == pytest.approx([(1 - TOL) * GAP, GAP, GAP], abs=1e-5)
