from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model.network import (
    MIN_INPUT_SIZE,
    AlexNet,
    AlexNetPaper,
    build_model,
    count_parameters,
    init_weights,
    paper_lrn,
)


def test_parameter_counts_of_both_layouts() -> None:
    assert count_parameters(build_model("alexnet", num_classes=1000)) == 61_100_840
    assert count_parameters(build_model("alexnet-paper", num_classes=1000)) == 60_965_224


@pytest.mark.parametrize("arch", ["alexnet", "alexnet-paper"])
@pytest.mark.parametrize("size", [224, 64, MIN_INPUT_SIZE])
def test_output_shape_at_any_size_from_63(arch: str, size: int) -> None:
    net = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)


def test_inputs_below_63_pixels_are_refused_by_the_pooling() -> None:
    net = build_model("alexnet", num_classes=3).eval()
    with pytest.raises(RuntimeError):
        net(torch.randn(1, 3, MIN_INPUT_SIZE - 1, MIN_INPUT_SIZE - 1))


def test_torchvision_state_dict_loads_and_gives_identical_outputs() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None).eval()
    ours = AlexNet(num_classes=1000).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


def test_paper_layout_groups_convolutions_as_split_across_two_gpus() -> None:
    net = AlexNetPaper()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert convs[1].weight.shape == (256, 48, 5, 5)  # "5x5x48" kernels in the paper
    assert convs[3].weight.shape == (384, 192, 3, 3)
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in net.modules()) == 2
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping


def test_lrn_matches_the_papers_formula() -> None:
    torch.manual_seed(0)
    a = torch.rand(2, 12, 5, 5) * 10
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expected = torch.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        expected[:, i] = a[:, i] / (k + alpha * s) ** beta
    torch.testing.assert_close(paper_lrn()(a), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_paper_initialisation() -> None:
    torch.manual_seed(0)
    net = AlexNetPaper(num_classes=10)
    init_weights(net, "paper")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for c in convs[1:]:  # conv1 has too few weights for a tight estimate
        assert abs(float(c.weight.std()) - 0.01) < 0.001
    assert [float(c.bias.mean()) for c in convs] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert [float(f.bias.mean()) for f in fcs] == [1.0, 1.0, 0.0]
    assert abs(float(fcs[0].weight.std()) - 0.01) < 0.0005


@torch.no_grad()
def test_default_initialisation_has_zero_biases_and_kaiming_convs() -> None:
    torch.manual_seed(0)
    net = build_model("alexnet", num_classes=10)
    conv2 = net.features[3]
    fan_out = conv2.out_channels * 5 * 5
    assert abs(float(conv2.weight.std()) - (2 / fan_out) ** 0.5) < 0.002
    assert all(
        float(m.bias.abs().sum()) == 0
        for m in net.modules()
        if hasattr(m, "bias") and m.bias is not None
    )


def test_unknown_arch_and_init_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="alexnet, alexnet-paper"):
        build_model("vgg", num_classes=10)
    with pytest.raises(ValueError, match="default, paper"):
        build_model("alexnet", num_classes=10, init="xavier")
    with pytest.raises(ValueError, match="at least 2"):
        build_model("alexnet", num_classes=1)
