"""Datasets the tests make: class folders of real image files (the built-in shapes, encoded
as PNG and JPEG) and archives of them, good and hostile."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

from model.synthetic import LABELS, render


def shape_images(classes: int = 3, per_class: int = 8, *, size: int = 72, seed: int = 5,
                 prefix: str = "") -> dict[str, bytes]:  # fmt: skip
    """{"<prefix><class>/<n>.png|jpg": bytes}: `per_class` images of each of the first
    `classes` built-in shapes."""
    out: dict[str, bytes] = {}
    for c in range(classes):
        for k in range(per_class):
            arr, label = render(seed, c + k * len(LABELS), size)
            assert label == c
            buf = io.BytesIO()
            fmt, ext = ("PNG", "png") if k % 2 else ("JPEG", "jpg")
            Image.fromarray(arr).save(buf, format=fmt)
            out[f"{prefix}{LABELS[c]}/{k:03d}.{ext}"] = buf.getvalue()
    return out


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def zip_bytes(files: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], *, mode: str = "w:gz",
              extra: list[tarfile.TarInfo] | None = None) -> bytes:  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info
