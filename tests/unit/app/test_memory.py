"""app/memory.py: freed heap memory goes back to the OS (glibc only)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from app.memory import MemoryTrimmer, _glibc, configure_allocator, resident_bytes

pytestmark = pytest.mark.skipif(_glibc() is None, reason="malloc_trim is glibc's")

# Blocks under any mmap threshold, every tenth kept: the other nine tenths are free chunks
# in the middle of the heap, which free() never returns and malloc_trim does.
FRAGMENT = """
    import sys
    from app.memory import MemoryTrimmer, configure_allocator, resident_bytes
    if sys.argv[1] == "capped":
        assert configure_allocator()
    blocks = [bytearray(100_000) for _ in range(3000)]  # ~286 MiB, touched
    keep = blocks[::10]
    del blocks
    held = resident_bytes()
    returned = []
    t = MemoryTrimmer(1.0, on_return=returned.append)
    got = t.check()
    print(held, got, resident_bytes(), t.trims, sum(returned), len(keep))
"""


@pytest.mark.parametrize("allocator", ["capped", "glibc"])
def test_a_trim_returns_the_free_middle_of_the_heap(allocator: str) -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FRAGMENT), allocator],
                         capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    held, got, after, trims, counted, _ = map(int, out.stdout.split())
    assert got >= 200 * 2**20, f"returned only {got / 2**20:.0f} MiB of ~257 MiB free"
    assert after <= held - got + 8 * 2**20  # what it says it returned left the RSS
    assert trims == 1 and counted == got  # the metric's callback saw the same bytes


def test_a_second_trim_has_nothing_to_return() -> None:
    t = MemoryTrimmer(1.0)
    t.check()
    assert t.check() < 4 * 2**20
    assert resident_bytes() > 0


def test_the_environment_wins_over_the_arena_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert configure_allocator() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=8")
    assert configure_allocator() is False


def test_interval_zero_never_trims() -> None:
    t = MemoryTrimmer(0)
    asyncio.run(asyncio.wait_for(t.run(), 10))  # returns at once instead of looping
    assert t.trims == 0
