"""Datasets as stored objects: an archive (zip, tar, tar.gz/bz2/xz) or a folder of class
folders imported into `<data_dir>/<name>/` with its manifest, atomically; listed, read and
deleted by name.

An import reads every member through the same decoder and limits as an upload, refuses the
whole archive for anything unsafe (a path leaving the folder, a link or device, a duplicate
name, an archive inside the archive, more members or more bytes than allowed: counted while
reading, never from the archive's headers), and skips with a reason each file that is not
a readable image. It writes into `<data_dir>/.tmp-import-<name>-*`, fsyncs, writes the
manifest and renames the folder into place: a dataset is either all there or absent.

The manifest (`manifest.json`) is the dataset's record: classes, every image with its split
and sha256, the content hash, the frozen holdout (a seeded, stratified share of each class,
or a pre-split `test/` folder as it is), the skipped-file report, where it came from. A
folder made by hand gets one at its first use (`ensure_manifest`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

from model.data import IMAGE_SUFFIXES, DatasetError
from model.files import atomic_write_bytes, fsync_dir
from model.images import DecodeLimits, ImageError, decode_image

log = logging.getLogger(__name__)

MANIFEST_FILE: Final = "manifest.json"
FORMAT_VERSION: Final = 1
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SPLIT_DIRS: Final = ("train", "val", "test")
DEFAULT_HOLDOUT_SPLIT: Final = 0.15
HOLDOUT_SEED: Final = 0
# Folder names under the data dir that are not imported datasets.
NOT_DATASETS: Final = frozenset({"cifar10"})
ARCHIVE_SUFFIXES: Final = (
    ".zip",
    ".tar",
    ".tgz",
    ".gz",
    ".bz2",
    ".xz",
    ".7z",
    ".rar",
    ".tbz2",
    ".txz",
)
_CHUNK: Final = 1 << 20
_MACOS_JUNK: Final = ("__MACOSX",)

Kind = Literal["unsupported", "malformed", "too_large", "too_many_files", "unusable",
               "bad_name", "exists", "busy", "no_space", "not_found"]  # fmt: skip


class DatasetImportError(DatasetError):
    """A dataset that cannot be imported (or found, or changed). `kind` says which, for the
    caller to turn into its own error (the service: 415, 400, 413, 422, 409, 507, 404)."""

    def __init__(self, kind: Kind, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.kind, self.details = kind, details


@dataclass(frozen=True)
class ImportLimits:
    """`max_bytes`: the archive and everything unpacked from it (each counted while read);
    `max_files`: members of the archive; `max_file_bytes`: one image (the upload limit)."""

    max_bytes: int = 2 * 1024**3
    max_files: int = 50_000
    max_file_bytes: int = 10 * 1024 * 1024
    decode: DecodeLimits = field(default_factory=DecodeLimits)


# ----------------------------------------------------------------------------- names


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise DatasetImportError(
            "bad_name",
            f"dataset name {name[:80]!r}: 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit",
        )
    if name in NOT_DATASETS:
        raise DatasetImportError("bad_name", f"{name!r} is the built-in CIFAR-10's folder: "
                                 "choose another name")  # fmt: skip
    return name


def member_parts(name: str) -> tuple[str, ...]:
    """A member's path as safe components, or DatasetImportError("malformed") naming why."""
    shown = name.encode("utf-8", "backslashreplace").decode("utf-8")[:200]
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetImportError("malformed", f"member name {shown!r} is not valid UTF-8") from None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise DatasetImportError(
            "malformed", f"member name {shown!r} has a NUL or control character"
        )
    if "\\" in name:
        raise DatasetImportError(
            "malformed",
            f"member name {shown!r} has a backslash: make the archive with '/' separators",
        )
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise DatasetImportError("malformed", f"member name {shown!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DatasetImportError("malformed", f"member name {shown!r} leaves the dataset ('..')")
    if any(len(p.encode()) > 255 for p in parts):
        raise DatasetImportError("malformed", f"member name {shown!r} has a part over 255 bytes")
    return parts


# ----------------------------------------------------------------------------- members


@dataclass
class Member:
    """One entry of an archive or folder. `read(limit)` returns at most `limit + 1` bytes
    (so the caller sees that a file is over `limit` without reading the rest)."""

    name: str
    kind: Literal["file", "dir", "link", "special"]
    read: Callable[[int], bytes]


def sniff(head: bytes) -> Literal["zip", "tar"] | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


def _read_bounded(f: IO[bytes], limit: int) -> bytes:
    out = bytearray()
    while len(out) <= limit:
        chunk = f.read(min(_CHUNK, limit + 1 - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's name as stored: `orig_filename`, since zipfile's `filename` silently
    ends at a NUL. Without the UTF-8 flag zipfile decodes cp437; most tools write UTF-8
    regardless, so the bytes are read as UTF-8 (invalid UTF-8 is then refused)."""
    name = info.orig_filename
    if info.flag_bits & 0x800:
        return name
    raw = name.encode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def _broken(what: str, exc: BaseException) -> DatasetImportError:
    return DatasetImportError("malformed", f"{what} cannot be read (truncated or corrupt?): {exc}")


def _zip_entries(f: IO[bytes]) -> int | None:
    """The member count the end-of-central-directory record states (read before the
    directory itself, which would otherwise be parsed whole, however long)."""
    try:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
        return None if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
    except (OSError, AttributeError, IndexError, TypeError, ValueError):
        return None  # zipfile itself says what is wrong below
    finally:
        f.seek(0)


def zip_members(f: IO[bytes], limits: ImportLimits) -> Iterator[Member]:
    stated = _zip_entries(f)
    if stated is not None and stated > limits.max_files:
        raise DatasetImportError(
            "too_many_files",
            f"the archive has {stated} members; at most {limits.max_files} "
            "(ALEXNET_MAX_DATASET_FILES)",
        )
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _broken("the zip file", exc) from exc
    except UnicodeDecodeError as exc:
        raise DatasetImportError("malformed", f"a member name is not valid UTF-8: {exc}") from exc
    if len(infos) > limits.max_files:
        raise DatasetImportError(
            "too_many_files",
            f"the archive has {len(infos)} members; at most {limits.max_files} "
            "(ALEXNET_MAX_DATASET_FILES)",
        )
    for info in infos:
        mode = info.external_attr >> 16
        name = _zip_name(info)
        if info.is_dir():
            yield Member(name, "dir", lambda _n: b"")
        elif mode and stat.S_ISLNK(mode):
            yield Member(name, "link", lambda _n: b"")
        elif mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            yield Member(name, "special", lambda _n: b"")
        elif info.flag_bits & 0x1:
            raise DatasetImportError(
                "malformed", f"member {name[:200]!r} is encrypted: send an unencrypted archive"
            )
        else:

            def read(limit: int, info: zipfile.ZipInfo = info) -> bytes:
                with zf.open(info) as m:
                    return _read_bounded(m, limit)

            yield Member(name, "file", read)


class _LastRead:
    """A tar's (decompressed) stream that remembers the last bytes read: after tarfile's
    last member, the block it stopped at must be the end-of-archive zero block (tarfile
    also stops, silently, at a header cut short or at garbage)."""

    def __init__(self, f: Any) -> None:
        self.f, self.last = f, b""

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.f.read(n)
        self.last = data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def tar_members(f: IO[bytes], limits: ImportLimits) -> Iterator[Member]:
    """A tar's members. The decompressed stream is bounded as it goes (`tf.offset`, where
    the next header starts, past `max_bytes` is refused before any of it is decompressed:
    skipped and oversized members count too), its end must be the end-of-archive block, and
    it is read to its end so that gzip's CRC and length are checked."""
    try:
        tf = tarfile.open(fileobj=f, mode="r:*")  # noqa: SIM115 (read lazily by the members)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise _broken("the tar archive", exc) from exc
    stream = _LastRead(tf.fileobj)
    tf.fileobj = stream  # type: ignore[assignment]
    count = 0
    while True:
        try:
            ti = tf.next()
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise _broken("the tar archive", exc) from exc
        if ti is None:
            break
        count += 1
        if count > limits.max_files:
            raise DatasetImportError(
                "too_many_files",
                f"the archive has more than {limits.max_files} members (ALEXNET_MAX_DATASET_FILES)",
            )
        if tf.offset > limits.max_bytes:
            raise DatasetImportError(
                "too_large",
                f"the archive unpacks to more than {limits.max_bytes} bytes "
                "(ALEXNET_MAX_DATASET_BYTES)",
            )
        if ti.isdir():
            yield Member(ti.name, "dir", lambda _n: b"")
        elif ti.issym() or ti.islnk():
            yield Member(ti.name, "link", lambda _n: b"")
        elif not ti.isreg():
            yield Member(ti.name, "special", lambda _n: b"")
        else:

            def read(limit: int, ti: tarfile.TarInfo = ti) -> bytes:
                m = tf.extractfile(ti)
                assert m is not None
                with m:
                    return _read_bounded(m, limit)

            yield Member(ti.name, "file", read)
        # (tarfile keeps every header read in tf.members; members are bounded above)
    if count and stream.last != bytes(tarfile.BLOCKSIZE):
        raise DatasetImportError(
            "malformed", "the tar archive ends inside a header or in garbage (truncated?)"
        )
    total = tf.offset
    try:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            if total > limits.max_bytes:
                raise DatasetImportError(
                    "too_large", f"the archive unpacks to more than {limits.max_bytes} bytes "
                    "(ALEXNET_MAX_DATASET_BYTES)",
                )  # fmt: skip
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise _broken("the compressed archive", exc) from exc


def folder_members(root: Path, limits: ImportLimits) -> Iterator[Member]:
    """A folder's entries as members, never following a link."""
    if not root.is_dir():
        raise DatasetImportError("not_found", f"{root} is not a folder")
    count = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        dirnames.sort()
        for entry in [*dirnames, *sorted(filenames)]:
            count += 1
            if count > limits.max_files:
                raise DatasetImportError(
                    "too_many_files",
                    f"{root} has more than {limits.max_files} entries (ALEXNET_MAX_DATASET_FILES)",
                )
            path = base / entry
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield Member(rel, "link", lambda _n: b"")
            elif stat.S_ISDIR(st.st_mode):
                yield Member(rel, "dir", lambda _n: b"")
            elif not stat.S_ISREG(st.st_mode):
                yield Member(rel, "special", lambda _n: b"")
            else:

                def read(limit: int, path: Path = path) -> bytes:
                    with path.open("rb") as fh:
                        return _read_bounded(fh, limit)

                yield Member(rel, "file", read)


def archive_members(f: IO[bytes], limits: ImportLimits) -> Iterator[Member]:
    head = f.read(512)
    f.seek(0)
    kind = sniff(head)
    if kind is None:
        raise DatasetImportError(
            "unsupported",
            "the body is not a zip, tar or tar.gz archive: send one archive of class folders "
            "(curl --data-binary @flowers.zip -H 'Content-Type: application/zip')",
        )
    return zip_members(f, limits) if kind == "zip" else tar_members(f, limits)


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Image:
    path: str  # relative to the dataset folder, '/'-separated
    label: int
    split: Literal["trainval", "train", "val", "holdout"]
    sha256: str
    size: int


def content_hash(images: list[Image]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs: the same files give the
    same hash wherever they came from."""
    h = hashlib.sha256()
    for im in sorted(images, key=lambda i: i.path):
        h.update(f"{im.path}\0{im.sha256}\n".encode())
    return h.hexdigest()


def holdout_count(n: int, share: float) -> int:
    """Images of a class of `n` kept out: `share` of them, at least one from a class of 3
    or more, and never so many that fewer than two are left to train and validate on."""
    if n < 3:
        return 0
    return min(max(round(n * share), 1), n - 2)


def draw_holdout(files: list[tuple[str, str]], share: float, seed: int, cls: str) -> set[str]:
    """A seeded share of one class's (path, sha256) files. Images are ranked by a hash of
    (seed, class, content), so the draw does not depend on the order they were found in,
    adding an image moves at most one other, and copies of one image go together."""

    def rank(sha: str) -> str:
        return hashlib.sha256(f"{seed}:{cls}:{sha}".encode()).hexdigest()

    k = holdout_count(len(files), share)
    by_sha: dict[str, list[str]] = {}
    for path, sha in files:
        by_sha.setdefault(sha, []).append(path)
    held: set[str] = set()
    for sha in sorted(by_sha, key=rank):
        if len(held) >= k:
            break
        if len(files) - len(held) - len(by_sha[sha]) < 2:
            continue  # never fewer than two left to train on
        held.update(by_sha[sha])
    return held


def holdout_digest(images: list[Image]) -> str:
    """sha256 over the holdout's (path, file sha256) pairs: two versions were judged on the
    same holdout, and trained away from it, only if this is the same."""
    return content_hash([i for i in images if i.split == "holdout"])


@dataclass(frozen=True)
class Manifest:
    name: str
    classes: list[str]
    images: list[Image]
    layout: Literal["class_folders", "pre_split"]
    holdout: dict[str, Any]  # share, seed, from ("drawn" | "test folder")
    skipped: list[dict[str, str]]
    source: str
    created_at: str
    hash: str
    total_bytes: int

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class, per split ("trainval": the pool each job splits itself)."""
        out: dict[str, dict[str, int]] = {}
        for im in self.images:
            per = out.setdefault(self.classes[im.label], {})
            per[im.split] = per.get(im.split, 0) + 1
        return {c: out.get(c, {}) for c in self.classes}

    def split_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for im in self.images:
            out[im.split] = out.get(im.split, 0) + 1
        return out

    def files(self, *splits: str) -> list[tuple[str, int]]:
        return [(im.path, im.label) for im in self.images if im.split in splits]

    def summary(self) -> dict[str, Any]:
        """What GET /admin/datasets lists (the image list and skipped report left out)."""
        return {
            "name": self.name, "spec": f"imagefolder:{self.name}", "classes": self.classes,
            "num_classes": len(self.classes), "images": len(self.images),
            "splits": self.split_totals(), "per_class": self.counts(), "bytes": self.total_bytes,
            "hash": self.hash, "layout": self.layout, "holdout": self.holdout,
            "created_at": self.created_at, "source": self.source,
            "skipped_count": len(self.skipped),
        }  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        """GET /admin/datasets/{name}: the summary and the skipped-file report."""
        return {**self.summary(), "skipped": self.skipped}

    def to_bytes(self) -> bytes:
        doc = {**self.as_json(), "format_version": FORMAT_VERSION,
               "images": [[i.path, i.label, i.split, i.sha256, i.size] for i in self.images]}  # fmt: skip
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_FILE
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {doc.get('format_version')!r}")
            return cls(
                name=doc["name"], classes=list(doc["classes"]),
                images=[Image(p, int(lab), sp, h, int(sz)) for p, lab, sp, h, sz in doc["images"]],
                layout=doc["layout"], holdout=dict(doc["holdout"]),
                skipped=list(doc["skipped"]), source=doc["source"],
                created_at=doc["created_at"], hash=doc["hash"], total_bytes=int(doc["bytes"]),
            )  # fmt: skip
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"{path} is unreadable ({exc}): re-import the dataset, or delete the file to "
                "have it rebuilt from the folder"
            ) from exc


# ----------------------------------------------------------------------------- import


@dataclass
class _Kept:
    parts: tuple[str, ...]
    sha256: str
    size: int


def _is_junk(parts: tuple[str, ...]) -> bool:
    return parts[0] in _MACOS_JUNK or any(p.startswith(".") for p in parts)


Entries = dict[tuple[str, ...], str]  # every member's safe path: "file" or "dir"


def _unpack(members: Iterator[Member], dest: Path, limits: ImportLimits, write: bool,
            skip_links: bool = False) -> tuple[list[_Kept], list[dict[str, str]], Entries]:  # fmt: skip
    """Read every member, refuse the archive for anything unsafe, keep the readable images
    (written under `dest` when `write`), and report the rest. `skip_links`: a folder's
    links are reported and not followed (in an archive they refuse it)."""
    kept: list[_Kept] = []
    skipped: list[dict[str, str]] = []
    seen: Entries = {}
    total = 0
    for m in members:
        parts = member_parts(m.name)
        if not parts:
            continue
        if m.kind == "link" and skip_links:
            skipped.append({"path": "/".join(parts), "reason": "a link: not followed"})
            continue
        if m.kind in ("link", "special"):
            what = "a link" if m.kind == "link" else "a device, FIFO or socket"
            raise DatasetImportError(
                "malformed", f"member {m.name[:200]!r} is {what}: only files and folders are "
                "accepted",
            )  # fmt: skip
        kind = "dir" if m.kind == "dir" else "file"
        if parts in seen and (kind == "file" or seen[parts] == "file"):
            raise DatasetImportError(
                "malformed", f"member name {m.name[:200]!r} appears twice in the archive"
            )
        for i in range(1, len(parts)):
            if seen.get(parts[:i]) == "file":
                raise DatasetImportError(
                    "malformed", f"{'/'.join(parts[:i])!r} is both a file and a folder"
                )
            seen.setdefault(parts[:i], "dir")
        seen[parts] = kind
        rel = "/".join(parts)
        if kind == "dir" or _is_junk(parts):
            if kind == "file":
                skipped.append({"path": rel, "reason": "hidden or macOS metadata file"})
            continue
        suffix = Path(parts[-1]).suffix.lower()
        if suffix in ARCHIVE_SUFFIXES:
            raise _nested(rel)
        try:
            data = m.read(limits.max_file_bytes)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                RuntimeError) as exc:  # fmt: skip
            raise _broken(f"member {rel[:200]!r}", exc) from exc
        except NotImplementedError as exc:  # an unsupported zip compression method
            raise DatasetImportError("unsupported", f"member {rel[:200]!r}: {exc}") from exc
        except OSError as exc:
            if exc.errno is not None:
                raise  # the disk, not the archive
            raise _broken(f"member {rel[:200]!r}", exc) from exc  # gzip's BadGzipFile
        if sniff(data[:512]) is not None:
            raise _nested(rel)
        total += len(data)
        if total > limits.max_bytes:
            raise DatasetImportError(
                "too_large",
                f"the archive unpacks to more than {limits.max_bytes} bytes "
                "(ALEXNET_MAX_DATASET_BYTES)",
            )
        if len(data) > limits.max_file_bytes:
            skipped.append({"path": rel, "reason": f"larger than {limits.max_file_bytes} bytes "
                            "(ALEXNET_MAX_UPLOAD_BYTES)"})  # fmt: skip
            continue
        if suffix not in IMAGE_SUFFIXES:
            skipped.append({"path": rel, "reason": f"not an image ({suffix or 'no'} suffix; "
                            f"expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"})  # fmt: skip
            continue
        try:
            decode_image(data, limits=limits.decode, min_side=1)
        except ImageError as exc:
            skipped.append({"path": rel, "reason": f"{exc.code}: {exc}"})
            continue
        if write:
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        kept.append(_Kept(parts, hashlib.sha256(data).hexdigest(), len(data)))
    return kept, skipped, seen


def _nested(rel: str) -> DatasetImportError:
    return DatasetImportError(
        "malformed", f"member {rel[:200]!r} is an archive inside the archive: unpack it and "
        "send one archive of class folders",
    )  # fmt: skip


@dataclass(frozen=True)
class Layout:
    root: tuple[str, ...]  # the one top folder the classes are in, or ()
    classes: list[str]
    images: list[Image]
    layout: Literal["class_folders", "pre_split"]
    holdout: dict[str, Any]


def plan_layout(kept: list[_Kept], entries: Entries, *, holdout_share: float, seed: int,
                skipped: list[dict[str, str]]) -> Layout:  # fmt: skip
    """Which images belong to which class and split: `<class>/<image>` (under at most one
    top folder) or `train/<class>/...` with `val/` and `test/`. Files outside a class folder
    are added to `skipped`; a class with no readable image is fatal, as are fewer than two
    classes."""
    visible = {p: k for p, k in entries.items() if not _is_junk(p)}
    root: tuple[str, ...] = ()
    tops = {p[0] for p in visible}
    if len(tops) == 1:
        top = next(iter(tops))
        # flowers/<class>/<image>: one top folder with images in folders inside it (a loose
        # flowers/cover.jpg is then reported, not taken as a class)
        nested = any(len(k.parts) >= 3 for k in kept)
        if visible.get((top,)) == "dir" and nested and (top not in SPLIT_DIRS or top == "train"):
            root = (top,)
    rel = {
        p[len(root) :]: k
        for p, k in visible.items()
        if p[: len(root)] == root and len(p) > len(root)
    }
    firsts = {p[0] for p, k in rel.items() if len(p) >= 2 or k == "dir"}
    pre_split = "train" in firsts and firsts <= set(SPLIT_DIRS)
    depth = 3 if pre_split else 2  # the parts of <split>/<class>/<image>, <class>/<image>

    def class_of(p: tuple[str, ...]) -> str:
        return p[depth - 2]

    if pre_split:
        classes_in = {split: {p[1] for p in rel if len(p) >= 2 and p[0] == split
                              and (len(p) >= 3 or rel[p] == "dir")} for split in SPLIT_DIRS}  # fmt: skip
        extra = (classes_in["val"] | classes_in["test"]) - classes_in["train"]
        if extra:
            raise DatasetImportError(
                "unusable", f"val/ or test/ has classes train/ lacks: {', '.join(sorted(extra))}"
            )
        classes = sorted(classes_in["train"])
    else:
        classes = sorted(p[0] for p, k in rel.items() if len(p) == 1 and k == "dir")
    if len(classes) < 2:
        raise DatasetImportError(
            "unusable",
            f"{len(classes)} class folder(s) ({', '.join(classes[:10]) or 'none'}); at least 2 "
            "are needed: one folder per class, <class>/<image>",
            details={"skipped": skipped[:100]},
        )
    index = {c: i for i, c in enumerate(classes)}
    by_class: dict[str, list[tuple[_Kept, tuple[str, ...]]]] = {c: [] for c in classes}
    for k in kept:
        p = k.parts[len(root) :]
        if len(k.parts) <= len(root) or k.parts[: len(root)] != root or len(p) < depth:
            where = "a split folder" if pre_split and len(p) == 2 else "the top folder"
            skipped.append({"path": "/".join(k.parts), "reason": f"in {where}, not in a class "
                            "folder (expected <class>/<image>)"})  # fmt: skip
            continue
        by_class[class_of(p)].append((k, p))
    holdout_from = "test folder" if pre_split and "test" in firsts else "drawn"
    images: list[Image] = []
    for cls in classes:
        entries_c = by_class[cls]
        pool = [p for _, p in entries_c if not pre_split or p[0] == "train"]
        if not pool:
            raise DatasetImportError(
                "unusable",
                f"class {cls!r} has no readable images{' in train/' if pre_split else ''}: add "
                "some, or remove the folder",
                details={"skipped": [s for s in skipped if f"/{cls}/" in "/" + s["path"]][:100]},
            )
        held: set[str] = set()
        if holdout_from == "drawn":
            pool_files = [("/".join(p), k.sha256) for k, p in entries_c
                          if not pre_split or p[0] == "train"]  # fmt: skip
            held = draw_holdout(pool_files, holdout_share, seed, cls)
        for k, p in entries_c:
            r = "/".join(p)
            split: Any = "holdout" if r in held else "trainval"
            if pre_split and r not in held:
                split = {"train": "train", "val": "val", "test": "holdout"}[p[0]]
            images.append(Image(r, index[cls], split, k.sha256, k.size))
    # A copy of a holdout image anywhere else (another name, another class, train/ beside
    # test/) would put the holdout into training: every copy is held out.
    held_shas = {i.sha256 for i in images if i.split == "holdout"}
    images = sorted((Image(i.path, i.label, "holdout", i.sha256, i.size)
                     if i.sha256 in held_shas else i for i in images), key=lambda i: i.path)  # fmt: skip
    holdout = {"share": holdout_share if holdout_from == "drawn" else None, "seed": seed,
               "from": holdout_from, "images": sum(i.split == "holdout" for i in images),
               "hash": holdout_digest(images)}  # fmt: skip
    return Layout(root, classes, images, "pre_split" if pre_split else "class_folders", holdout)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def name_lock(data_dir: Path, name: str) -> Iterator[None]:
    """Dataset `name`'s lock (an exclusive flock, non-blocking): DatasetImportError("busy")
    while another import, deletion, first manifest or job check of it is under way, in
    this process or another (the CLI, servers sharing the home)."""
    locks = data_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetImportError(
                "busy", f"dataset {name!r} is being imported, deleted or checked right now; "
                "retry when that has finished",
            ) from None  # fmt: skip
        yield
    finally:
        os.close(fd)


Guard = Callable[[], None]  # called under the name's lock just before a change; raises to stop it


class DatasetStore:
    """The datasets under `data_dir`: import, list, read, delete. Safe across processes
    (the CLI and servers sharing a home): one import or deletion of a name at a time.

    Temp folders: `.tmp-import-<name>-*` (an import being written), `.tmp-trash-<name>-*`
    (the dataset a replace is swapping out: put back at the next start if the new one never
    arrived) and `.tmp-deleted-<name>-*` (being removed)."""

    def __init__(self, data_dir: Path, limits: ImportLimits | None = None,
                 holdout_share: float = DEFAULT_HOLDOUT_SPLIT) -> None:  # fmt: skip
        self.data_dir, self.limits = data_dir, limits or ImportLimits()
        self.holdout_share = holdout_share

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        return name_lock(self.data_dir, name)

    def clean_stale(self) -> list[str]:
        """What imports, replaces and deletions that died (a killed server) left: removed,
        or, for a replace that died between its two renames, the old dataset put back. Only
        names no live process holds the lock of."""
        done: list[str] = []
        if not self.data_dir.is_dir():
            return done
        for p in sorted(self.data_dir.glob(".tmp-*")):
            if p.name.startswith(".tmp-upload-"):
                if _unlocked_file(p):
                    p.unlink(missing_ok=True)
                    done.append(p.name)
                continue
            m = re.fullmatch(r"\.tmp-(import|trash|deleted)-(.+)-[0-9a-f]{8}", p.name)
            if m is None:
                continue
            kind, name = m.groups()
            try:
                with self.lock(name):
                    final = self.data_dir / name
                    if kind == "trash" and not final.exists() and p.exists():
                        p.rename(final)
                        fsync_dir(self.data_dir)
                        done.append(f"{p.name} -> {name}")
                    else:
                        shutil.rmtree(p, ignore_errors=True)
                        done.append(p.name)
            except DatasetImportError:
                continue  # a live import's
        if done:
            log.warning("cleaned up after %d unfinished dataset change(s): %s", len(done), done)
        return done

    @contextlib.contextmanager
    def upload_file(self) -> Iterator[IO[bytes]]:
        """A temp file in the data dir for an upload's bytes (on the disk the dataset goes
        to, so a full disk shows at once), locked while open, removed after."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / f".tmp-upload-{uuid.uuid4().hex[:8]}"
        f = path.open("w+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield f
        finally:
            f.close()
            path.unlink(missing_ok=True)

    # -- import

    def import_archive(self, f: IO[bytes], name: str, *, source: str, replace: bool = False,
                       guard: Guard | None = None) -> Manifest:  # fmt: skip
        """Import the archive in the seekable file `f` as dataset `name`. `guard` runs under
        the name's lock just before the dataset appears (or replaces the old one)."""
        check_name(name)
        return self._import(name, lambda: archive_members(f, self.limits), source, replace,
                            guard, skip_links=False)  # fmt: skip

    def import_folder(self, folder: Path, name: str, *, replace: bool = False,
                      guard: Guard | None = None) -> Manifest:  # fmt: skip
        """Copy a folder of class folders in as dataset `name` (links are not followed)."""
        check_name(name)
        if folder.resolve() == (self.data_dir / name).resolve():
            raise DatasetImportError("exists", f"{folder} is dataset {name!r} already")
        return self._import(name, lambda: folder_members(folder, self.limits),
                            f"folder {folder}", replace, guard, skip_links=True)  # fmt: skip

    def import_members(self, members: Callable[[], Iterator[Member]], name: str, *,
                       source: str, replace: bool = False) -> Manifest:  # fmt: skip
        """Import entries another store produces (labelled feedback's export), through the
        same checks, layout plan and writer as an archive."""
        check_name(name)
        return self._import(name, members, source, replace, None, skip_links=False)

    def _import(self, name: str, members: Callable[[], Iterator[Member]], source: str,
                replace: bool, guard: Guard | None, *, skip_links: bool) -> Manifest:  # fmt: skip
        final = self.data_dir / name
        with self.lock(name):
            if final.exists() and not replace:
                raise exists_error(name)
            tmp = self.data_dir / f".tmp-import-{name}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir(parents=True)
                kept, skipped, entries = _unpack(members(), tmp, self.limits, write=True,
                                                 skip_links=skip_links)  # fmt: skip
                if not kept:
                    raise DatasetImportError(
                        "unusable", "no readable images in it: one folder per class, "
                        "<class>/<image> (jpg, png, webp, gif, bmp)",
                        details={"skipped": skipped[:100]},
                    )  # fmt: skip
                lay = plan_layout(kept, entries, holdout_share=self.holdout_share,
                                  seed=HOLDOUT_SEED, skipped=skipped)  # fmt: skip
                src = tmp.joinpath(*lay.root)
                manifest = _manifest(name, lay, skipped, source)
                _drop_unlisted(src, {i.path for i in lay.images})
                atomic_write_bytes(src / MANIFEST_FILE, manifest.to_bytes())
                _fsync_tree(src)
                if final.exists() and not replace:  # (made by hand meanwhile)
                    raise exists_error(name)
                if guard is not None:
                    guard()
                self._swap_in(src, final, name)
                return manifest
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DatasetImportError(
                        "no_space", f"the disk under {self.data_dir} filled up while importing "
                        f"{name!r}; nothing was kept: free space and retry",
                    ) from exc  # fmt: skip
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def _swap_in(self, src: Path, final: Path, name: str) -> None:
        trash = None
        if final.exists():
            trash = self.data_dir / f".tmp-trash-{name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
        src.rename(final)
        fsync_dir(self.data_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    # -- reading

    def names(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.iterdir()
                      if p.is_dir() and NAME_RE.fullmatch(p.name) and p.name not in NOT_DATASETS)  # fmt: skip

    def get(self, name: str, *, build: bool = True) -> Manifest:
        """The dataset's manifest; a folder made by hand gets one now (`build`), exactly as
        a job's first use would make it."""
        check_name(name)
        folder = self.data_dir / name
        if not folder.is_dir():
            raise DatasetImportError("not_found", f"no dataset {name!r} (GET /admin/datasets "
                                     "lists them)")  # fmt: skip
        return ensure_manifest(folder, holdout_share=self.holdout_share, build=build)

    def delete(self, name: str, *, guard: Guard | None = None) -> int:
        """Rename the folder away, then remove it; the bytes freed. `guard` runs under the
        name's lock first."""
        check_name(name)
        final = self.data_dir / name
        with self.lock(name):
            if not final.is_dir():
                raise DatasetImportError("not_found", f"no dataset {name!r}")
            if guard is not None:
                guard()
            size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
            gone = self.data_dir / f".tmp-deleted-{name}-{uuid.uuid4().hex[:8]}"
            final.rename(gone)
            fsync_dir(self.data_dir)
            shutil.rmtree(gone, ignore_errors=True)
        return size


def exists_error(name: str) -> DatasetImportError:
    return DatasetImportError(
        "exists", f"dataset {name!r} exists; import with replace=true (CLI: --replace) to "
        "replace it, or delete it first",
    )  # fmt: skip


def ensure_manifest(folder: Path, *, holdout_share: float = DEFAULT_HOLDOUT_SPLIT,
                    build: bool = True) -> Manifest:  # fmt: skip
    """The folder's manifest, written now (from its files, checked like a folder import,
    under the name's lock) when it has none: the holdout of a dataset made by hand is drawn
    at its first use. No limit on the count of files (it is the user's own folder); each
    image within the upload decoder's default limits."""
    try:
        return Manifest.read(folder)
    except FileNotFoundError:
        if not build:
            raise
    try:
        with name_lock(folder.parent, folder.name):
            with contextlib.suppress(FileNotFoundError):
                return Manifest.read(folder)  # another process made it meanwhile
            return _build_manifest(folder, holdout_share)
    except DatasetImportError as exc:
        raise DatasetError(f"imagefolder {folder}: {exc}") from exc


def _build_manifest(folder: Path, holdout_share: float) -> Manifest:
    limits = ImportLimits(max_bytes=2**62, max_files=10**9)
    kept, skipped, entries = _unpack(folder_members(folder, limits), folder, limits,
                                     write=False, skip_links=True)  # fmt: skip
    if not kept:
        raise DatasetImportError("unusable", "no readable images: one folder per class")
    lay = plan_layout(kept, entries, holdout_share=holdout_share, seed=HOLDOUT_SEED,
                      skipped=skipped)  # fmt: skip
    if lay.root:
        raise DatasetImportError("unusable", f"its class folders are inside {lay.root[0]}/: "
                                 "move them up")  # fmt: skip
    manifest = _manifest(folder.name, lay, skipped, "folder made by hand")
    atomic_write_bytes(folder / MANIFEST_FILE, manifest.to_bytes())
    log.info("imagefolder %s: manifest written (%d images, %d held out)", folder,
             len(lay.images), lay.holdout["images"])  # fmt: skip
    return manifest


def _manifest(name: str, lay: Layout, skipped: list[dict[str, str]], source: str) -> Manifest:
    return Manifest(name=name, classes=lay.classes, images=lay.images, layout=lay.layout,
                    holdout=lay.holdout, skipped=skipped, source=source, created_at=_now(),
                    hash=content_hash(lay.images), total_bytes=sum(i.size for i in lay.images))  # fmt: skip


def _drop_unlisted(root: Path, keep: set[str]) -> None:
    """Remove what the manifest does not list (files outside class folders, empty dirs)."""
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root):
        fsync_dir(Path(dirpath))


def _unlocked_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
    except FileNotFoundError:
        return False
