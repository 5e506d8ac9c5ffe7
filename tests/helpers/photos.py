"""Real public-domain photos: scikit-image's and matplotlib's sample data (dev extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "brick.png", "grass.png", "color.png")  # fmt: skip


def photo_paths() -> list[Path]:
    """Real public-domain photos shipped with scikit-image and matplotlib (dev extra)."""
    out: list[Path] = []
    spec = importlib.util.find_spec("skimage")
    if spec and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        out += [data / n for n in PHOTOS if (data / n).is_file()]
    mpl = importlib.util.find_spec("matplotlib")
    if mpl and mpl.submodule_search_locations:
        p = (
            Path(next(iter(mpl.submodule_search_locations)))
            / "mpl-data/sample_data/grace_hopper.jpg"
        )
        if p.is_file():
            out.append(p)
    return out
