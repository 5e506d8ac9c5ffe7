"""Fine-tuning from a version: which tensors are kept, which re-initialised, which frozen,
and the learning rate of the kept ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from model.checkpoint import load_version
from model.config import TrainConfig
from model.fine_tune import head_names, load_base_weights, param_groups
from model.network import build_model
from model.synthetic import LABELS
from model.trainer import Trainer
from tests.helpers.versions import make_version

TINY = {"dataset": "synthetic:96", "image_size": 64, "batch_size": 16, "epochs": 1,
        "precision": "fp32", "device": "cpu", "workers": 0, "lr": 0.02}  # fmt: skip


def _fit(tmp_path: Path, base: str, **kw: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cfg = TrainConfig(**{**TINY, "base": base, **kw})
    result = Trainer(cfg, data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                     run_dir=tmp_path / f"run-{kw.get('freeze', 'none')}",
                     callback=lambda ev: events.append(ev.model_dump())).fit()  # fmt: skip
    net, _ = load_version(tmp_path / "models" / result.card.version)
    start = next(e for e in events if e["type"] == "start")
    return net.state_dict(), start["base"]


@pytest.fixture
def base(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    card = make_version(tmp_path / "models", labels=list(LABELS), image_size=64)
    net, _ = load_version(tmp_path / "models" / card.version)
    return card.version, net.state_dict()


def test_a_linear_probe_changes_only_the_head(
    tmp_path: Path, base: tuple[str, dict[str, torch.Tensor]]
) -> None:
    """freeze=all-but-head trains fc8 alone (the e2e suite runs the other modes)."""
    version, before = base
    after, info = _fit(tmp_path, version, freeze="all-but-head")
    # the same labels in the same order: every tensor, the head too, came from the base
    assert info["reinitialised"] == [] and info["freeze"] == "all-but-head"
    head = head_names(build_model("alexnet", num_classes=len(LABELS)))
    assert all(torch.equal(after[k], before[k]) for k in after if k not in head)
    assert not any(torch.equal(after[k], before[k]) for k in head)  # it learnt


def test_other_labels_reinitialise_the_head_even_at_the_same_count(tmp_path: Path) -> None:
    models = tmp_path / "models"
    same = make_version(models, labels=list(LABELS), image_size=64)
    other = make_version(models, num_classes=10, image_size=64)  # class_0..class_9
    # (another number of classes: tests/e2e/test_train_cli.py)
    for card, reinit in ((same, []), (other, ["classifier.6.bias", "classifier.6.weight"])):
        net = build_model("alexnet", num_classes=len(LABELS))
        info = load_base_weights(net, models, card, list(LABELS))
        assert info["reinitialised"] == reinit, card.labels


def test_kept_layers_learn_at_the_scaled_rate() -> None:
    net = build_model("alexnet", num_classes=4)
    groups = param_groups(net, lr=0.1, freeze="features", base_lr_scale=0.1,
                          reinitialised=head_names(net))  # fmt: skip
    new, kept = groups
    assert new["lr"] == 0.1 and kept["lr"] == pytest.approx(0.01)
    assert len(new["params"]) == 2 and len(kept["params"]) == 4  # fc8; fc6, fc7
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("features.") for n in frozen)
    [only] = param_groups(build_model("alexnet", num_classes=4), lr=0.1, freeze="all-but-head",
                          base_lr_scale=0.5, reinitialised=())  # fmt: skip
    assert only["lr"] == pytest.approx(0.05) and len(only["params"]) == 2


@pytest.mark.parametrize("kw", [{"freeze": "features"}, {"base_lr_scale": 0.1}])
def test_fine_tune_options_need_a_base(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="give base"):
        TrainConfig(dataset="synthetic", **kw)
    TrainConfig(dataset="synthetic", base="v1", **kw)
