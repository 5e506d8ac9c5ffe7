"""Handing freed memory back to the OS after a burst.

glibc's malloc keeps what a burst freed: the main heap shrinks only from its top, and each
of up to 8 arenas per core keeps its own free pages and its own top, which `free()` gives
back only past a trim threshold that grows with every large block freed (up to 64 MiB).
After a hostile run (bench/attack_memory.py) the server stayed ~50% above its warm size
for as long as it ran. Two things bring it back:

- `configure_allocator()`, once at `alexnet serve` start, before any thread: at most
  `ARENAS` arenas (the decode and model threads share them; `malloc_trim` can release the
  free pages inside a thread arena but not its top, so fewer arenas hold less), unless
  MALLOC_ARENA_MAX is set. The mmap threshold is left to glibc: fixed at 256 KiB, every
  batch's activations were mapped and faulted in afresh and capacity fell by a fifth.
- `MemoryTrimmer`: every ALEXNET_MEMORY_TRIM_S seconds, `malloc_trim(0)` returns the free
  pages of every arena, wherever in its heap they are.

Neither does anything where the C library is not glibc (musl, macOS).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # <malloc.h>
ARENAS = 2  # measured: the same capacity as glibc's 16 on 2 cores, and memory comes back


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def configure_allocator() -> bool:
    """Cap glibc's arenas at `ARENAS`. The environment wins: MALLOC_ARENA_MAX (or a
    GLIBC_TUNABLES malloc setting) set by the user is left alone. True when the setting
    was made."""
    libc = _glibc()
    if (
        libc is None
        or "MALLOC_ARENA_MAX" in os.environ
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, ARENAS))


def resident_bytes() -> int:
    """This process's resident size, from /proc/self/statm (0 where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim() -> int:
    """malloc_trim(0): every arena's free pages back to the OS. Bytes returned (by RSS)."""
    libc = _glibc()
    if libc is None:
        return 0
    before = resident_bytes()
    libc.malloc_trim(0)
    return max(0, before - resident_bytes())


class MemoryTrimmer:
    """Trims every `interval_s` seconds, in a thread (it holds each arena's lock while it
    walks it). With nothing to return a trim takes ~0.05 ms; after a burst it returns
    hundreds of MiB in ~30 ms (2-core EPYC). So no rule for when: after a burst the freed
    memory is back within one interval, and under steady traffic it costs nothing."""

    def __init__(self, interval_s: float, on_return: Callable[[int], None] | None = None) -> None:
        self.interval_s, self.on_return = interval_s, on_return
        self.trims = 0
        self.available = _glibc() is not None

    async def run(self) -> None:
        if not self.available or self.interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.to_thread(self.check)

    def check(self) -> int:
        """One trim. Bytes returned."""
        t0 = time.perf_counter()
        returned = trim()
        self.trims += 1
        if self.on_return is not None:
            self.on_return(returned)
        if returned >= 1 << 20:
            log.debug("returned %.0f MiB to the OS in %.1f ms (resident %.0f MiB)",
                      returned / 2**20, (time.perf_counter() - t0) * 1000,
                      resident_bytes() / 2**20)  # fmt: skip
        return returned
