"""MicroBatcher: batch formation, no wait when idle, deadlines, error fan-out, stop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from app.batching import BatchFailed, Closed, Expired, MicroBatcher, QueueFull, Row
from app.errors import from_batcher_error


class FakeModel:
    """Records batch sizes; each batch takes `delay_s`; can be made to fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.batches, self.fail = delay_s, [], False
        self.short = False  # answer one row too few
        self.gate: threading.Event | None = None

    def __call__(self, model: Any, batch: torch.Tensor, k: int) -> list[Row]:
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        self.batches.append((model, batch.shape[0]))
        if self.fail:
            raise RuntimeError("boom")
        # the "class" is the image's first pixel value, probability 1
        rows = [[(int(x[0, 0, 0]), 1.0)] for x in batch]
        return rows[1:] if self.short else rows


def img(v: int) -> torch.Tensor:
    return torch.full((3, 4, 4), v, dtype=torch.uint8)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_lone_request_on_an_idle_model_runs_at_once() -> None:
    async def main() -> float:
        fake = FakeModel()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=8, max_batch_wait_ms=5000)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        row = await b.submit(img(3), "m", top_k=1, deadline=loop.time() + 5)
        elapsed = time.perf_counter() - t0
        await b.stop()
        assert row == [(3, 1.0)]
        return elapsed

    # max_batch_wait_ms is 5 s, but nothing else is coming: no wait at all (the bound is a
    # generous timeout; waiting would take the whole 5 s)
    assert run(main()) < 2.5


def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    async def main() -> list[Any]:
        fake = FakeModel()
        fake.gate = threading.Event()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=4, max_batch_wait_ms=0)
        b.start()
        deadline = asyncio.get_running_loop().time() + 5
        first = b.submit(img(0), "m", top_k=1, deadline=deadline)
        await asyncio.sleep(0.05)  # the first batch (of one) is now running, blocked
        rest = [b.submit(img(i), "m", top_k=1, deadline=deadline) for i in range(1, 7)]
        fake.gate.set()
        rows = await asyncio.gather(first, *rest)
        await b.stop()
        assert [r[0][0] for r in rows] == list(range(7))
        return fake.batches

    assert [n for _, n in run(main())] == [1, 4, 2]


def test_batch_waits_boundedly_for_requests_still_decoding() -> None:
    async def main() -> list[Any]:
        fake = FakeModel()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=4, max_batch_wait_ms=10_000)
        b.start()
        deadline = asyncio.get_running_loop().time() + 5
        with b.incoming(2):
            f1 = b.submit(img(1), "m", top_k=1, deadline=deadline)
            await asyncio.sleep(0.02)
            f2 = b.submit(img(2), "m", top_k=1, deadline=deadline)
        await asyncio.gather(f1, f2)
        await b.stop()
        return fake.batches

    assert [n for _, n in run(main())] == [2]


def test_items_for_different_models_never_share_a_batch() -> None:
    async def main() -> list[Any]:
        fake = FakeModel()
        fake.gate = threading.Event()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=8, max_batch_wait_ms=0)
        b.start()
        d = asyncio.get_running_loop().time() + 5
        futs = [b.submit(img(0), "old", top_k=1, deadline=d)]
        await asyncio.sleep(0.05)
        futs += [b.submit(img(i), m, top_k=1, deadline=d)
                 for i, m in enumerate(["old", "new", "old", "new"], 1)]  # fmt: skip
        fake.gate.set()
        await asyncio.gather(*futs)
        await b.stop()
        return fake.batches

    assert run(main()) == [("old", 1), ("old", 2), ("new", 2)]


def test_expired_requests_are_dropped_before_compute() -> None:
    async def main() -> None:
        fake = FakeModel()
        fake.gate = threading.Event()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=8, max_batch_wait_ms=0)
        b.start()
        loop = asyncio.get_running_loop()
        busy = b.submit(img(0), "m", top_k=1, deadline=loop.time() + 5)
        await asyncio.sleep(0.05)
        late = b.submit(img(1), "m", top_k=1, deadline=loop.time() + 0.01)
        await asyncio.sleep(0.05)
        fake.gate.set()
        await busy
        with pytest.raises(Expired) as info:
            await late
        assert from_batcher_error(info.value).status == 504  # as the API answers it
        await b.stop()
        assert [n for _, n in fake.batches] == [1]  # the expired one never ran

    run(main())


def test_cancelled_requests_are_skipped() -> None:
    async def main() -> None:
        fake = FakeModel()
        fake.gate = threading.Event()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=8, max_batch_wait_ms=0)
        b.start()
        d = asyncio.get_running_loop().time() + 5
        busy = b.submit(img(0), "m", top_k=1, deadline=d)
        await asyncio.sleep(0.05)
        gone = b.submit(img(1), "m", top_k=1, deadline=d)
        kept = b.submit(img(2), "m", top_k=1, deadline=d)
        gone.cancel()  # the client disconnected
        fake.gate.set()
        await asyncio.gather(busy, kept)
        await b.stop()
        assert [n for _, n in fake.batches] == [1, 1]

    run(main())


@pytest.mark.parametrize("failure", ["fail", "short"])  # raises; answers a row too few
def test_a_failed_batch_fails_only_that_batch_and_the_worker_lives_on(failure: str) -> None:
    async def main() -> None:
        fake = FakeModel()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=8, max_batch_wait_ms=0)
        b.start()
        d = asyncio.get_running_loop().time() + 5
        setattr(fake, failure, True)
        futs = [b.submit(img(i), "m", top_k=1, deadline=d) for i in range(3)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, BatchFailed) for r in results)
        assert from_batcher_error(results[0]).status == 500  # type: ignore[arg-type]
        setattr(fake, failure, False)
        assert await b.submit(img(5), "m", top_k=1, deadline=d) == [(5, 1.0)]
        await b.stop()

    run(main())


def test_a_full_queue_is_refused_with_a_retry_after() -> None:
    async def main() -> None:
        fake = FakeModel()
        fake.gate = threading.Event()
        b: MicroBatcher[str] = MicroBatcher(
            fake, max_batch_size=1, max_batch_wait_ms=0, max_queue=2
        )
        b.start()
        d = asyncio.get_running_loop().time() + 5
        running = b.submit(img(0), "m", top_k=1, deadline=d)
        await asyncio.sleep(0.05)
        queued = [b.submit(img(i), "m", top_k=1, deadline=d) for i in (1, 2)]
        with pytest.raises(QueueFull) as info:
            b.submit(img(3), "m", top_k=1, deadline=d)
        with pytest.raises(QueueFull):
            b.admit()  # refused up front, before the body is parsed or decoded
        err = from_batcher_error(info.value)  # as the API answers it
        assert err.status == 429 and err.headers() is not None
        assert int(err.headers()["Retry-After"]) >= 1  # type: ignore[index]
        fake.gate.set()
        await asyncio.gather(running, *queued)
        await b.stop()

    run(main())


def test_admission_counts_images_being_decoded() -> None:
    async def main() -> None:
        b: MicroBatcher[str] = MicroBatcher(FakeModel(), max_queue=2)
        b.admit()
        with b.incoming(2), pytest.raises(QueueFull, match="2 being decoded"):
            b.admit()
        b.admit()

    run(main())


def test_admission_bounds_the_queue_in_time_at_the_measured_rate() -> None:
    async def main() -> None:
        b: MicroBatcher[str] = MicroBatcher(FakeModel(), max_queue=256, max_queue_wait_s=0.5)
        with b.incoming(100):
            b.admit()  # no rate measured yet: only the count applies
            b._rate = 400.0  # images/s
            b.admit()  # 101 images drain in 0.25 s
            b._rate = 100.0
            with pytest.raises(QueueFull, match=r"would take 1\.0 s"):
                b.admit()
        b.admit()

    run(main())


def test_stop_drains_then_fails_what_is_left() -> None:
    async def main() -> None:
        fake = FakeModel()
        fake.gate = threading.Event()
        b: MicroBatcher[str] = MicroBatcher(fake, max_batch_size=1, max_batch_wait_ms=0)
        b.start()
        d = asyncio.get_running_loop().time() + 5
        futs = [b.submit(img(i), "m", top_k=1, deadline=d) for i in range(3)]
        await asyncio.sleep(0.05)
        await b.stop(drain_timeout_s=0.1)  # the model is stuck: nothing drains
        fake.gate.set()
        results = await asyncio.gather(*futs[1:], return_exceptions=True)
        assert all(isinstance(r, Closed) for r in results)
        assert from_batcher_error(results[0]).status == 503  # type: ignore[arg-type]
        with pytest.raises(Closed) as info:
            b.submit(img(9), "m", top_k=1, deadline=d)
        err = from_batcher_error(info.value)  # as the API answers it
        assert err.status == 503 and err.headers() == {"Retry-After": "5"}

    run(main())


def test_top_k_is_cut_per_request() -> None:
    async def main() -> None:
        def many(model: Any, batch: torch.Tensor, k: int) -> list[Row]:
            return [[(i, 1.0 / (i + 1)) for i in range(k)] for _ in batch]

        b: MicroBatcher[str] = MicroBatcher(many, max_batch_size=8, max_batch_wait_ms=0)
        b.start()
        d = asyncio.get_running_loop().time() + 5
        r1, r3 = await asyncio.gather(b.submit(img(0), "m", top_k=1, deadline=d),
                                      b.submit(img(0), "m", top_k=3, deadline=d))  # fmt: skip
        assert len(r1) == 1 and len(r3) == 3
        await b.stop()

    run(main())
