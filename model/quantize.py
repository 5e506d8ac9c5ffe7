"""int8 serving on the CPU: static post-training quantization of a version's network (PT2E
with torchao's X86 Inductor quantizer), compiled ahead of time by AOTInductor, cached on
disk.

Quantization: the network (not the input normalisation, which stays fp32 in `Classifier`)
is exported with `torch.export`, observed by `prepare_pt2e` with
`get_default_x86_inductor_quantization_config()` (uint8 activations per tensor, int8
weights per output channel, symmetric), and converted with `convert_pt2e`.

Calibration (what sets the activation ranges) runs on what the version itself carries:

- its probe files (`<version>/probes/`, model/probes.py: the writer's own validation
  images for a trained version, the generated scenes for an imported one), decoded by the
  serving path;
- `CALIBRATION_IMAGES` built-in images (model/synthetic.py's shapes) at the model's
  resize size, rendered with another seed than the load-time agreement check's
  (app/registry.py `_probe_batch`), so that check measures int8 on images calibration did
  not see.

A version's card names its holdout only by hash (`holdout_hash`), not by files, so there
are no held-out images to add.

Compilation: AOTInductor (`aoti_compile_and_package` with `freezing`, which lets the
int8 convolutions and linears become oneDNN's fused, prepacked kernels). Measured on a
2-core EPYC (AVX-512-VNNI, docs/benchmarks.md): a batch dimension left dynamic costs
~5x (98 img/s at batch 32 where the static program does ~470), so each batch size the
server warms up at (every power of two up to max_batch_size) gets its own static program, and a
batch between two of them is padded up to the next one (above the largest: split). A
program is a `.pt2` file: what `torch.compile` cannot be, a single artefact that loads in
~0.2 s without quantizing or compiling again.

The cache: `<cache_dir>/int8/<version>-<key>/b<batch>.pt2` plus `meta.json`, where the
key hashes the weights' sha256, torch's and torchao's versions, the CPU kind (model name
and the flags that change the kernels: VNNI, AMX, AVX-512...) and the input size. Files
are written under a temporary name and renamed. A file that does not load (or does not
run) is discarded with a warning and rebuilt; a cache folder that cannot be written (a
read-only home) only means no cache: the program is built in a temporary folder and
served from memory. A `.pt2` holds a compiled shared library that is loaded into the
server: the cache folder must be writable by the service only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from model.device import cpu_flags, cpu_info
from model.files import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT: Final = 1  # of the cache; part of the key
INSTALL_HINT: Final = "pip install 'alexnet-service[int8]'"
CALIBRATION_IMAGES: Final = 64
CALIBRATION_SEED: Final = 8  # the agreement check renders seed 7 (app/registry.py)
# The CPU flags that change which int8/bf16 kernels oneDNN and Inductor pick.
KERNEL_FLAGS: Final = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                       "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip
FAST_INT8_FLAGS: Final = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


class Int8Error(RuntimeError):
    """int8 cannot be built or loaded here (the message says why)."""


def torchao_version() -> str | None:
    """torchao's version without importing it (None: not installed)."""
    if importlib.util.find_spec("torchao") is None:
        return None
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


def available() -> bool:
    return torchao_version() is not None


def cpu_has_fast_int8() -> bool:
    """True where the CPU has int8 dot products (VNNI or AMX). Only a fallback for a cache
    written before the speed-up was measured: int8 measured 1.9x fp32 on AVX2 alone."""
    return bool(FAST_INT8_FLAGS & cpu_flags())


def cpu_kind() -> dict[str, Any]:
    """The CPU as far as a compiled program depends on it: its model and kernel flags."""
    name, flags = cpu_info()
    return {"model": name, "flags": [f for f in KERNEL_FLAGS if f in flags]}


def cache_key(weights_sha256: str, image_size: int) -> dict[str, Any]:
    """What a cached program depends on; `key_hash` of it names its folder."""
    return {"format": FORMAT, "weights_sha256": weights_sha256, "torch": torch.__version__,
            "torchao": torchao_version(), "cpu": cpu_kind(), "image_size": image_size}  # fmt: skip


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cache_folder(cache_dir: Path, version: str, key: dict[str, Any]) -> Path:
    return cache_dir / "int8" / f"{version}-{key_hash(key)}"


# ------------------------------------------------------------------ quantize, compile


def quantize(net: nn.Module, calibration: torch.Tensor, batch: int = 32) -> nn.Module:
    """`net` (fp32, eval) statically quantized, calibrated on `calibration` (the
    network's inputs: normalised float (N, 3, S, S))."""
    if not available():
        raise Int8Error(f"int8 needs torchao: {INSTALL_HINT}")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    net = net.float().eval().to(memory_format=torch.contiguous_format)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    example = calibration[:2].contiguous()
    with torch.no_grad():
        exported = torch.export.export(
            net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
        )
        observed = prepare_pt2e(exported.module(), quantizer)  # type: ignore[arg-type]
        for start in range(0, len(calibration), batch):
            observed(calibration[start : start + batch].contiguous())
        converted: nn.Module = convert_pt2e(observed)
    return converted


def compile_program(qnet: nn.Module, batch: int, image_size: int, path: Path) -> None:
    """An AOTInductor package of `qnet` at a static `batch`, written atomically to `path`."""
    x = torch.zeros(batch, 3, image_size, image_size)
    with torch.no_grad():
        exported = torch.export.export(qnet, (x,))
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp.pt2")
    # Freezing, with grad off, lets Inductor fold the int8 weights into oneDNN's prepacked
    # qconv/qlinear; with grad on the weights stay plain and are dequantized on every call
    # (measured: 25x slower at batch 1).
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(tmp), inductor_configs={"freezing": True}
            )
        with tmp.open("rb+") as f:  # on disk before it has its name: a crash leaves no torn file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_program(path: Path, batch: int, image_size: int,
                 sha256: str | None = None) -> Callable[[torch.Tensor], Any]:  # fmt: skip
    """A compiled program, run once to make sure it works (raises when it does not). With
    `sha256` (recorded when it was compiled), a file that changed since is refused before
    it is loaded: it holds a shared library, and a damaged one can crash the process."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise Int8Error(f"{path.name}: its sha256 differs from the one recorded when compiled")
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.inference_mode():
        out = runner(torch.zeros(batch, 3, image_size, image_size))
    if not isinstance(out, torch.Tensor) or out.shape[0] != batch:
        raise Int8Error(f"{path.name}: the program answers {type(out).__name__}, not logits")
    return runner  # type: ignore[no-any-return]


class Int8Program(nn.Module):
    """The compiled programs, one per batch size, as the network a `Classifier` runs:
    float (B, 3, S, S) in, float32 logits out, any B (padded up to the next compiled batch
    size, or split above the largest)."""

    def __init__(self, runners: dict[int, Callable[[torch.Tensor], Any]]) -> None:
        super().__init__()
        self.runners = dict(sorted(runners.items()))
        self.sizes = tuple(self.runners)
        # Classifier reads its dtype and device from the first parameter.
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        n, largest = x.shape[0], self.sizes[-1]
        if n > largest:
            return torch.cat([self(x[i : i + largest]) for i in range(0, n, largest)])
        bs = next(b for b in self.sizes if b >= n)
        if bs != n:
            x = torch.cat([x, x.new_zeros(bs - n, *x.shape[1:])])
        out: torch.Tensor = self.runners[bs](x)
        return out[:n]


@dataclass
class Built:
    program: Int8Program
    cache: str  # hit | miss | partial | rebuilt | off | unwritable
    folder: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache": self.cache, "batch_sizes": list(self.program.sizes),
                               **{f"{k}_s": round(v, 2) for k, v in self.seconds.items()}}  # fmt: skip
        if self.notes:
            out["cache_notes"] = self.notes
        return out


def _writable(folder: Path) -> str | None:
    """None where `folder` can be created and written, else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".w{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{folder}: {exc.strerror or exc}"
    return None


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Atomically; a folder that cannot be written is left as it is."""
    try:
        atomic_write_bytes(
            folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode()
        )
    except OSError as exc:
        log.warning("int8 cache %s: meta.json not written (%s)", folder, exc.strerror or exc)


def cached(cache_dir: Path | None, version: str, key: dict[str, Any],
           sizes: Sequence[int]) -> Path | None:  # fmt: skip
    """The cache folder of a program that passed the load-time guard, with every batch
    size in `sizes` (None: there is none). Reads only: nothing is built or loaded."""
    if cache_dir is None:
        return None
    folder = cache_folder(cache_dir, version, key)
    meta = read_meta(folder)
    if meta.get("key") != key or meta.get("guard_passed") is not True:
        return None
    if not all((folder / f"b{b}.pt2").is_file() for b in sizes):
        return None
    return folder


SPEED_KEYS: Final = ("speedup_vs_fp32", "speedup_vs_bf16")


def measured_speedup_of(meta: dict[str, Any]) -> dict[str, float]:
    """The int8 program's speed over fp32's (and bf16's) that its first load measured, from
    its cache's meta.json ({}: none recorded, e.g. a cache written before it was)."""
    return {k: float(v) for k in SPEED_KEYS if isinstance(v := meta.get(k), int | float)}


def build(
    net_factory: Callable[[], nn.Module],
    calibration: Callable[[], torch.Tensor],
    *,
    version: str,
    key: dict[str, Any],
    sizes: Sequence[int],
    image_size: int,
    cache_dir: Path | None,
    allow_build: bool = True,
) -> Built:
    """The int8 program for these batch sizes: from the cache where it is there and loads,
    else quantized (`net_factory()` calibrated on `calibration()`) and compiled, and
    cached. `allow_build=False`: the cache only (raises `Int8Error` on a miss)."""
    sizes = sorted(set(sizes))
    seconds: dict[str, float] = {}
    notes: list[str] = []
    folder = cache_folder(cache_dir, version, key) if cache_dir is not None else None
    writable = False
    if folder is not None:
        why = _writable(folder)
        writable = why is None
        if why is not None:
            log.warning("int8: the cache is not writable (%s): a program built now is not kept",
                        why)  # fmt: skip
            notes.append(f"cache not writable: {why}")
    recorded = read_meta(folder) if folder is not None else {}
    hashes: dict[str, str] = recorded.get("files", {}) if recorded.get("key") == key else {}
    tmpdir: str | None = None
    try:
        runners: dict[int, Callable[[torch.Tensor], Any]] = {}
        missing: list[int] = []
        corrupt = False
        t0 = time.perf_counter()
        for b in sizes:
            path = folder / f"b{b}.pt2" if folder is not None else None
            if path is None or not path.is_file():
                missing.append(b)
                continue
            try:
                runners[b] = load_program(path, b, image_size, hashes.get(path.name))
            except Exception as exc:  # any failure to load is a cache problem, not fatal
                log.warning("int8 cache: %s does not load (%s: %s): discarded, rebuilt",
                            path, type(exc).__name__, exc)  # fmt: skip
                notes.append(f"{path.name} did not load ({type(exc).__name__}): rebuilt")
                corrupt = True
                if writable:
                    path.unlink(missing_ok=True)
                missing.append(b)
        seconds["load"] = time.perf_counter() - t0
        if missing:
            if not allow_build:
                raise Int8Error(f"no cached int8 program for batch sizes {missing}")
            out = folder if writable and folder is not None else None
            if out is None:
                tmpdir = tempfile.mkdtemp(prefix="alexnet-int8-")
                out = Path(tmpdir)
            t0 = time.perf_counter()
            qnet = quantize(net_factory(), calibration())
            seconds["quantize"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in missing:
                path = out / f"b{b}.pt2"
                compile_program(qnet, b, image_size, path)
                hashes[path.name] = file_sha256(path)
                runners[b] = load_program(path, b, image_size)
            seconds["compile"] = time.perf_counter() - t0
            del qnet
        if folder is None:
            status = "off"
        elif not missing:
            status = "hit"
        elif not writable:
            status = "unwritable"
        elif corrupt:
            status = "rebuilt"
        else:
            status = "miss" if len(missing) == len(sizes) else "partial"
        meta = read_meta(folder) if folder is not None else {}
        if meta.get("key") != key:
            meta = {"key": key, "version": version, "created_at": time.time()}
        kept = folder if folder is not None and (writable or not missing) else None
        if missing and kept is not None:
            meta["files"] = {k: v for k, v in hashes.items() if (kept / k).is_file()}
            meta.pop("guard_passed", None)  # a new program: the guard has not passed it yet
            for k in SPEED_KEYS:  # nor has its speed been measured
                meta.pop(k, None)
            write_meta(kept, meta)
        if missing and writable and cache_dir is not None and folder is not None:
            remove_cached(cache_dir, version, superseded_by=(folder, key))  # an older torch's
        return Built(Int8Program(runners), status, kept if writable else None, seconds,
                     notes, meta)  # fmt: skip
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)  # loaded: the files are not needed


def remove_cached(cache_dir: Path | None, version: str,
                  superseded_by: tuple[Path, dict[str, Any]] | None = None) -> int:  # fmt: skip
    """Delete a version's cached programs: all of them, or with `superseded_by` (the folder
    just written and its key) those it replaces: compiled on the same CPU kind by another
    torch, torchao or cache format, which will never load again here. (Folders for other
    CPU kinds stay: servers on other machines may share this home.) Bytes freed."""
    if cache_dir is None or not (cache_dir / "int8").is_dir():
        return 0
    freed = 0
    for d in (cache_dir / "int8").glob(f"{version}-*"):
        if not d.is_dir():
            continue
        if superseded_by is not None:
            keep, key = superseded_by
            other = read_meta(d).get("key")
            if d == keep or (isinstance(other, dict) and other.get("cpu") != key["cpu"]):
                continue
        freed += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        shutil.rmtree(d, ignore_errors=True)
    if freed:
        log.info("int8 cache: removed %d bytes of %s's programs", freed, version)
    return freed


def record_guard(built: Built, passed: bool, agreement: float,
                 speed: dict[str, float] | None = None) -> None:  # fmt: skip
    """Remember in the cache whether the program passed the load-time guard (`auto`
    serves int8 only from a cache that says it did; the guard runs again anyway) and how
    much faster than fp32 (and bf16) it measured (`auto` takes it only where faster)."""
    if built.folder is None:
        return
    meta = dict(built.meta, guard_passed=passed, agreement_with_fp32=round(agreement, 4))
    meta.update(speed or {})
    write_meta(built.folder, meta)
    built.meta = meta
