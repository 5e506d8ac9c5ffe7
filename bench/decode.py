"""Decode + preprocess one upload (JPEG photo -> uint8 (3, 224, 224)): the options tried.

decode_tensor (model/images.py) is what the service uses: torchvision.io for a baseline
JPEG that Pillow would decode at full scale, Pillow (with draft for large JPEGs) otherwise.

python bench/decode.py            # prints a markdown table
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import jpeg_photos, machine, photo_paths, table
from model.images import decode_image, decode_tensor, to_tensor
from model.pretrained import IMAGENET_PRE
from model.transforms import EvalTransform

PRE = IMAGENET_PRE
TF = EvalTransform(PRE)


def pillow_full_v2(data: bytes) -> torch.Tensor:
    return TF(to_tensor(decode_image(data)))


def pillow_draft_v2(data: bytes) -> torch.Tensor:  # what the service did before decode_tensor
    return TF(to_tensor(decode_image(data, min_side=PRE.min_side)))


def service(data: bytes) -> torch.Tensor:  # what the service does
    return TF(decode_tensor(data, min_side=PRE.min_side))


def pillow_pil_resize(data: bytes) -> torch.Tensor:
    img = decode_image(data)
    img = F1.center_crop(F1.resize(img, [PRE.resize_size], antialias=True), [PRE.image_size])
    return F1.pil_to_tensor(img)


def torchvision_io_v2(data: bytes) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return TF(decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True))


def torchvision_io_v1(data: bytes) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_jpeg(raw, mode=ImageReadMode.RGB)
    return F1.center_crop(F1.resize(img, [PRE.resize_size], antialias=True), [PRE.image_size])


OPTIONS: list[tuple[str, Callable[[bytes], torch.Tensor]]] = [
    ("Pillow full decode + torch uint8 resize", pillow_full_v2),
    ("decode_tensor + torch uint8 resize (used)", service),
    ("Pillow draft decode + torch uint8 resize", pillow_draft_v2),
    ("Pillow full decode + PIL resize", pillow_pil_resize),
    ("torchvision.io.decode_jpeg + torch uint8 resize", torchvision_io_v2),
    ("torchvision.io.decode_jpeg + float resize (v1)", torchvision_io_v1),
]


def main() -> None:
    torch.set_num_threads(1)  # decoding runs one image per thread in the service
    rows = []
    if not photo_paths():
        raise SystemExit("no sample photos: pip install -e '.[dev]' (scikit-image)")
    with tempfile.TemporaryDirectory() as tmp:
        for size in [(451, 300), (640, 480), (1024, 768), (3000, 2000)]:
            files = jpeg_photos(Path(tmp) / f"{size[0]}", size)
            datas = [f.read_bytes() for f in files]
            ref = [pillow_full_v2(d).float() for d in datas]
            for name, fn in OPTIONS:
                for d in datas[:2]:
                    fn(d)
                reps = 3 if size[0] > 2000 else 10 if size[0] > 700 else 30
                t0 = time.perf_counter()
                for _ in range(reps):
                    outs = [fn(d) for d in datas]
                ms = (time.perf_counter() - t0) / (reps * len(datas)) * 1000
                diff = max(
                    float((o.float() - r).abs().mean()) for o, r in zip(outs, ref, strict=True)
                )
                rows.append(
                    [f"{size[0]}x{size[1]}", name, f"{ms:.2f}", f"{1000 / ms:.0f}", f"{diff:.2f}"]
                )
    print(f"Machine: {machine()} (decode on 1 thread)\n")
    print(table(["JPEG", "decoder + preprocessing", "ms/image", "images/s",
                 "mean abs diff vs full decode (grey levels)"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
