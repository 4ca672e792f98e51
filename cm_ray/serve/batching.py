"""Batching helpers of the transformers adapter servers (no torch at import): ``MixedBatcher``
(mixed-adapter batches, a failed batch retried request by request), ``FiniteGuard`` (a row with
non-finite scores ends at once and is reported), ``StopFilter`` (stop strings on a text stream)
and the cancellation criterion of a stream the client dropped.
"""

from __future__ import annotations

import asyncio
import threading


class FiniteGuard:
    """transformers LogitsProcessor: a row whose scores hold NaN or +inf (an adapter that yields
    non-finite values) is recorded in ``bad`` and forced to end (EOS), so that its batch
    neighbours finish normally."""

    def __init__(self, eos: int):
        self.eos, self.bad = eos, set()

    def __call__(self, input_ids, scores):
        import torch

        rows = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1)
        if bool(rows.any()):
            self.bad.update(int(i) for i in rows.nonzero().flatten())
            scores[rows] = float("-inf")
            scores[rows, self.eos] = 0.0
        return scores


class _Cancelled:
    """StoppingCriteria: stop every row once ``event`` is set."""

    def __init__(self, event: threading.Event | None):
        self.event = event

    def __call__(self, input_ids, scores, **kw):
        import torch

        stop = self.event is not None and self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class StopFilter:
    """Cuts a text stream at the first stop string: ``push(piece)`` returns what can be sent now
    (a tail that may begin a stop string is held back), ``flush()`` the rest at the end."""

    def __init__(self, stops: list[str] | None):
        self.stops = [x for x in stops or [] if x]
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.buf, self.stopped = "", False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buf += piece
        hits = [self.buf.index(x) for x in self.stops if x in self.buf]
        if hits:
            self.stopped, out, self.buf = True, self.buf[:min(hits)], ""
            return out
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


class MixedBatcher:
    """Collects requests for any adapter into batches of up to ``max_batch_size``, waiting at
    most ``wait_s`` after the first, and runs ``run(items) -> results`` (blocking, in a thread)
    one batch at a time; requests that arrive meanwhile form the next batch. Plain asyncio on
    purpose: Serve's ``@serve.batch`` splits batches by multiplexed model id, which would keep
    different cultures out of one forward pass."""

    def __init__(self, run, max_batch_size: int, wait_s: float):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: dict) -> dict:
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._task = loop.create_task(self._serve())
        fut = loop.create_future()
        await self.queue.put((item, fut))
        return await fut

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # done = cancelled
            if not live:
                continue
            await self._run(live)

    async def _run(self, live: list) -> None:
        """Run one batch; when it fails, run each of its requests alone, so that only a request
        that fails by itself gets the error (one bad adapter never fails its neighbours)."""
        try:
            results = await asyncio.to_thread(self.run, [item for item, _ in live])
        except Exception as e:
            if len(live) > 1:
                for one in live:
                    await self._run([one])
                return
            if not live[0][1].done():
                live[0][1].set_exception(e)
            return
        for (_, fut), result in zip(live, results):
            if not fut.done():
                fut.set_result(result)
