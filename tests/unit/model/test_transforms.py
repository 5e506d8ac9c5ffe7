from __future__ import annotations

import pytest
import torch
from torchvision.models import AlexNet_Weights
from torchvision.transforms.v2 import functional as F

from model.transforms import EvalTransform, Normalize, Preprocessing
from tests.helpers.presets import torchvision_v2_preset


def test_for_size_scales_torchvisions_recipe() -> None:
    assert Preprocessing.for_size(224).resize_size == 256
    assert Preprocessing.for_size(64).resize_size == 73


def test_bad_preprocessing_is_refused() -> None:
    with pytest.raises(ValueError, match="center_crop, stretch"):
        Preprocessing(64, 73, resize="pad")
    with pytest.raises(ValueError, match="smaller"):
        Preprocessing(64, 32)


def test_eval_transform_matches_torchvisions_own_on_the_same_pixels() -> None:
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 300, 451), dtype=torch.uint8)
    ours = Normalize(Preprocessing(224, 256))(EvalTransform(Preprocessing(224, 256))(img)[None])
    torch.testing.assert_close(ours, torchvision_v2_preset()(img)[None], rtol=0, atol=1e-6)
    # The legacy preset resizes through float32 (10x slower): at most one grey level apart.
    legacy = AlexNet_Weights.IMAGENET1K_V1.transforms()(img)[None]
    assert float((ours - legacy).abs().max()) <= 1.01 / 255 / min(Preprocessing(224, 256).std)


def test_one_image_and_a_batch_take_the_same_path() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tf = EvalTransform(Preprocessing.for_size(64))
    out = tf(batch)
    assert out.shape == (4, 3, 64, 64) and out.dtype == torch.uint8
    for i in range(4):
        assert torch.equal(out[i], tf(batch[i]))


def test_stretch_policy_ignores_aspect_ratio() -> None:
    img = torch.zeros(3, 50, 200, dtype=torch.uint8)
    out = EvalTransform(Preprocessing(64, 64, resize="stretch"))(img)
    assert out.shape == (3, 64, 64)


def test_normalize_accepts_uint8_and_unit_floats_alike() -> None:
    pre = Preprocessing(64, 73, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(Normalize(pre)(x), torch.full((1, 3, 2, 2), 2.0))
    torch.testing.assert_close(Normalize(pre)(x.float() / 255), torch.full((1, 3, 2, 2), 2.0))


def test_extreme_aspect_ratios_are_cropped_before_resizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20000x1 image (a 143-byte PNG) once became 5,120,000 x 256 pixels on the way to a
    224 crop: gigabytes per request. The longer side is now cut to 3x the shorter first."""
    import model.transforms as T

    sizes: list[int] = []
    real_resize = T.F.resize

    def recording_resize(image: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        out: torch.Tensor = real_resize(image, *a, **kw)  # type: ignore[arg-type]
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(T.F, "resize", recording_resize)
    tf = EvalTransform(Preprocessing.for_size(224))
    for shape in ((3, 1, 20_000), (3, 20_000, 1), (3, 7, 9_000)):
        assert tf(torch.zeros(shape, dtype=torch.uint8)).shape == (3, 224, 224)
    assert max(sizes) <= 3 * 256 * 3 * 256, sizes


def test_cropping_a_long_side_first_keeps_what_the_crop_sees() -> None:
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 200, 1000), dtype=torch.uint8)  # 5:1, cropped to 3:1
    pre = Preprocessing.for_size(224)
    unbounded = F.center_crop(F.resize(img, [pre.resize_size], antialias=True), [224, 224])
    ours = EvalTransform(pre)(img)
    assert (ours.int() - unbounded.int()).abs().max() <= 1
