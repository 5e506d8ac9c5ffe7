"""MicroBatcher: a bounded queue in front of one model executor.

- A lone request on an idle model runs at once: the worker never sleeps while it has work.
- While a batch runs, new requests queue and form the next batch (up to max_batch_size).
- `max_batch_wait_ms` only bounds how long a started batch waits for requests that are
  already being decoded (announced with `incoming()`): an upper bound, not a sleep.
- Expired requests are dropped before compute (504); cancelled ones (client gone) skipped.
- An exception fails every future of that batch only; the worker lives on (a batch that
  returns the wrong number of rows too).
- It raises its own exceptions (`BatcherError` and below); app/errors.py maps them to HTTP.
- Items carry the model they were preprocessed for, so a hot swap never mixes versions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from model.predictor import Row

log = logging.getLogger(__name__)


class BatcherError(Exception):
    """Why the batcher did not answer; `retry_after_s` when trying again later may work."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(BatcherError):
    """Refused before any work was spent on it: the queue is full, or would take too long."""


class Closed(BatcherError):
    """The batcher is shutting down."""


class Expired(BatcherError):
    """The request's deadline passed while it waited for the model."""


class BatchFailed(BatcherError):
    """The model call failed on the batch this request was in."""


M = TypeVar("M")  # the model handle items are prepared for


@dataclass
class _Item(Generic[M]):
    tensor: torch.Tensor  # uint8 (3, S, S)
    model: M
    top_k: int
    deadline: float  # loop.time()
    future: asyncio.Future[Row]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What the worker reports after each batch (the app turns it into metrics)."""

    size: int
    queue_wait_s: list[float]
    compute_s: float


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch; uint8 images beside float ones ([0, 1], e.g. preprocessed tensors sent
    through the Open Inference Protocol) are scaled to floats the way the model would."""
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.float().div_(255.0) if t.dtype == torch.uint8 else t.float() for t in tensors]
    return torch.stack(tensors)


RunBatch = Callable[[Any, torch.Tensor, int], list[Row]]


class MicroBatcher(Generic[M]):
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 32,
        max_batch_wait_ms: float = 2.0,
        max_queue: int = 256,
        max_queue_wait_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_batch_wait_ms / 1000
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self._on_batch = on_batch
        self._queue: collections.deque[_Item[M]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._incoming = 0
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._rate = 0.0  # images/s through the model, EWMA
        self._closed = False
        self.busy = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Stop taking work, finish what is queued within `drain_timeout_s`, then fail
        whatever is left with 503."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._queue or self.busy) and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Closed("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ submitting

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def rate(self) -> float:
        return self._rate

    def retry_after_s(self) -> float:
        """Seconds until the queue has drained at the measured service rate."""
        rate = self._rate or 1.0
        return min(60.0, max(1.0, (len(self._queue) + 1) / rate))

    @contextlib.contextmanager
    def incoming(self, n: int = 1) -> Iterator[None]:
        """Announce `n` requests being decoded: a batch may wait (bounded) for them."""
        self._incoming += n
        try:
            yield
        finally:
            self._incoming -= n

    def admit(self, n: int = 1) -> None:
        """Refuse (429) before any work is spent on a request the queue cannot take: the
        waiting images plus those being decoded already fill it, or would take longer
        than `max_queue_wait_s` at the measured rate (so the wait of accepted requests
        is bounded in time on any device, not only in count)."""
        if self._closed:
            raise Closed("the server is shutting down", retry_after_s=5)
        ahead = len(self._queue) + self._incoming
        if ahead + n > self.max_queue:
            raise QueueFull(
                f"the queue is full ({len(self._queue)} waiting, {self._incoming} being "
                "decoded); retry later",
                retry_after_s=self.retry_after_s(),
            )
        if (
            self.max_queue_wait_s
            and self._rate
            and (ahead + n) / self._rate > self.max_queue_wait_s
        ):
            raise QueueFull(
                f"the queue would take {(ahead + n) / self._rate:.1f} s at the measured "
                f"{self._rate:.0f} images/s (limit {self.max_queue_wait_s:g} s); retry later",
                retry_after_s=self.retry_after_s(),
            )

    def submit(
        self, tensor: torch.Tensor, model: M, *, top_k: int, deadline: float
    ) -> asyncio.Future[Row]:
        """Queue one preprocessed image; the future resolves to its top-k row."""
        if self._closed:
            raise Closed("the server is shutting down", retry_after_s=5)
        if len(self._queue) >= self.max_queue:
            raise QueueFull(
                f"the queue is full ({len(self._queue)} waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )
        fut: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(tensor, model, top_k, deadline, fut))
        self._wakeup.set()
        return fut

    # ------------------------------------------------------------------ the worker

    def _take_batch(self, now: float) -> list[_Item[M]]:
        """Up to max_batch_size live items for the model of the first live one."""
        batch: list[_Item[M]] = []
        skipped: list[_Item[M]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled: the client went away
                continue
            if item.deadline <= now:
                item.future.set_exception(
                    Expired("the request waited too long in the queue before compute")
                )
                continue
            if batch and item.model is not batch[0].model:
                skipped.append(item)  # another version: the next batch
                continue
            batch.append(item)
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _gather(self) -> None:
        """Give requests that are still decoding a bounded chance to join this batch."""
        if self.max_wait_s <= 0:
            return
        start = time.perf_counter()
        while (
            self._incoming > 0
            and len(self._queue) < self.max_batch_size
            and time.perf_counter() - start < self.max_wait_s
        ):
            await asyncio.sleep(0.0005)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather()
            batch = self._take_batch(loop.time())
            if not batch:
                continue
            self.busy = True
            try:
                await self._run(batch, loop)
            finally:
                self.busy = False

    async def _run(self, batch: list[_Item[M]], loop: asyncio.AbstractEventLoop) -> None:
        started = time.perf_counter()
        waits = [started - it.enqueued for it in batch]
        k = max(it.top_k for it in batch)
        try:
            stacked = _stack([it.tensor for it in batch])
            rows = await loop.run_in_executor(
                self._executor, self._run_batch, batch[0].model, stacked, k
            )
            answers = list(zip(batch, rows, strict=True))  # one row per item, or it failed
        except Exception as exc:
            log.exception("model failed on a batch of %d", len(batch))
            err = BatchFailed(f"the model failed on this batch: {type(exc).__name__}")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        compute_s = time.perf_counter() - started
        inst = len(batch) / max(compute_s, 1e-6)
        self._rate = inst if self._rate == 0 else 0.8 * self._rate + 0.2 * inst
        for it, row in answers:
            if not it.future.done():
                it.future.set_result(row[: it.top_k])
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), waits, compute_s))
