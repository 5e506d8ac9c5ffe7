"""model/export.py: ONNX, .pt2 and the Triton repository reproduce what the service answers
(the served probabilities of real photos, within 1e-4, at several batch sizes), carry the
version's metadata and temperature, and nothing is kept that failed its check."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from model import export as E
from model.checkpoint import ModelCard, load_version
from model.device import Placement
from model.images import DecodeLimits
from model.predictor import Predictor
from tests.helpers.versions import make_version

LABELS = ["tiger cat", "café crème", 'say "cheese"', "a/b", "five", "six", "seven", "eight",
          "nine", "ten"]  # fmt: skip
TEMPERATURE = 2.5


@dataclass
class Served:
    """What the service answers for each photo, and the export's input for it, computed
    here from the exported metadata alone (pixels / 255, then mean and std)."""

    names: list[str]
    inputs: torch.Tensor  # (N, 3, S, S) float32, normalised
    probabilities: torch.Tensor  # (N, C): the served answer, with the temperature
    plain: torch.Tensor  # (N, C): the softmax of the logits without it


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    """A calibrated version (temperature 2.5) with probe images and awkward labels."""
    models = tmp_path_factory.mktemp("models")
    card = make_version(models, labels=LABELS, probes=True, version="cal-1",
                        calibration={"temperature": TEMPERATURE})  # fmt: skip
    return models / card.version, card


@pytest.fixture(scope="module")
def photos(jpeg_photos: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in jpeg_photos]


@pytest.fixture(scope="module")
def served(version: tuple[Path, ModelCard], photos: list[tuple[str, bytes]]) -> Served:
    vdir, card = version
    net, card = load_version(vdir)
    predictor = Predictor(net, card, Placement(torch.device("cpu"), "fp32"))
    pre = json.loads(E.metadata(card)["alexnet.preprocessing"])
    mean = torch.tensor(pre["mean"]).view(3, 1, 1)
    std = torch.tensor(pre["std"]).view(3, 1, 1)
    inputs, probs, plain = [], [], []
    for _, data in photos:
        p, logits = predictor.scores(data, DecodeLimits())  # the serving path, one file
        probs.append(p)
        plain.append(torch.softmax(logits, dim=0))
        x = predictor.decode(data, DecodeLimits()).float() / pre["pixel_scale"]
        inputs.append((x - mean) / std)
    return Served([n for n, _ in photos], torch.stack(inputs), torch.stack(probs),
                  torch.stack(plain))  # fmt: skip


@pytest.fixture(scope="module")
def onnx_export(version: tuple[Path, ModelCard], photos: list[tuple[str, bytes]],
                tmp_path_factory: pytest.TempPathFactory) -> E.ExportResult:  # fmt: skip
    return E.export_version(version[0], "onnx", tmp_path_factory.mktemp("onnx"),
                            check_images=photos)  # fmt: skip


@pytest.fixture(scope="module")
def triton_export(version: tuple[Path, ModelCard], photos: list[tuple[str, bytes]],
                  tmp_path_factory: pytest.TempPathFactory) -> E.ExportResult:  # fmt: skip
    return E.export_version(version[0], "triton", tmp_path_factory.mktemp("repo"),
                            name="flowers", max_batch_size=8, max_queue_delay_us=1500)  # fmt: skip


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_probs(session: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["probabilities"], {"input": x.numpy()})[0])


def test_onnx_reproduces_the_served_probabilities(onnx_export: E.ExportResult,
                                                  served: Served) -> None:  # fmt: skip
    r = onnx_export
    assert r.path.name == "cal-1.onnx" and r.files == [r.path] and r.path.is_file()
    assert r.bytes == r.path.stat().st_size > 1_000_000
    assert r.check.passed and r.check.max_difference <= 1e-4
    assert r.check.images == served.names and r.check.batch_sizes == [len(served.names), 1]
    assert r.images_source == "the given images" and r.details["opset"] >= 18
    assert not [p for p in r.path.parent.iterdir() if p != r.path]  # no temp file left
    session = _session(r.path)
    for batch in (served.inputs[:5], served.inputs[5:6], served.inputs):  # dynamic batch
        got = _ort_probs(session, batch)
        want = served.probabilities[: len(batch)] if len(batch) != 1 else served.probabilities[5:6]
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-4


def test_onnx_signature_and_metadata(onnx_export: E.ExportResult) -> None:
    model = onnx.load(str(onnx_export.path), load_external_data=False)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "probabilities"
    assert (
        inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    )
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[0] and dims[1:] == [3, 64, 64]
    assert [d.dim_value for d in out.type.tensor_type.shape.dim][1:] == [10]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["alexnet.version"] == "cal-1" and meta["alexnet.arch"] == "alexnet"
    assert json.loads(meta["alexnet.labels"]) == LABELS
    assert meta["alexnet.num_classes"] == "10" and float(meta["alexnet.temperature"]) == 2.5
    pre = json.loads(meta["alexnet.preprocessing"])
    assert pre["image_size"] == 64 and pre["resize_size"] == 73 and pre["resize"] == "center_crop"
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert pre["interpolation"] == "bilinear" and pre["layout"] == "NCHW"
    assert len(meta["alexnet.weights_sha256"]) == 64
    # ONNX Runtime reads the same metadata.
    assert (
        _session(onnx_export.path).get_modelmeta().custom_metadata_map["alexnet.version"] == "cal-1"
    )


def test_the_calibration_temperature_is_in_the_graph(onnx_export: E.ExportResult,
                                                     served: Served) -> None:  # fmt: skip
    got = _ort_probs(_session(onnx_export.path), served.inputs)
    assert float((got - served.probabilities).abs().max()) <= 1e-4
    # ... and the plain softmax is clearly something else (the test would notice T = 1).
    assert float((got - served.plain).abs().max()) > 0.05
    assert torch.allclose(got.sum(dim=1), torch.ones(len(got)), atol=1e-5)


def test_pt2_reproduces_the_served_probabilities(
    version: tuple[Path, ModelCard], photos: list[tuple[str, bytes]], served: Served,
    tmp_path: Path,
) -> None:  # fmt: skip
    r = E.export_version(version[0], "pt2", tmp_path, check_images=photos)
    assert r.path == tmp_path / "cal-1.pt2" and r.check.passed
    assert r.check.runtime == "torch.export" and r.check.batch_sizes == [len(photos), 1]
    assert sorted(tmp_path.iterdir()) == [r.path]
    extra = dict.fromkeys(E.metadata(version[1]), "")
    program = torch.export.load(r.path, extra_files=extra)
    assert json.loads(extra["alexnet.labels"]) == LABELS and extra["alexnet.version"] == "cal-1"
    assert json.loads(extra["alexnet.preprocessing"])["image_size"] == 64
    assert list(program.graph_signature.user_inputs) == ["input"]
    module = program.module()
    with torch.inference_mode():
        for batch in (served.inputs[:3], served.inputs):
            got = module(batch)
            assert float((got - served.probabilities[: len(batch)]).abs().max()) <= 1e-4


def test_triton_repository_parses_as_triton_config(triton_export: E.ExportResult,
                                                   served: Served) -> None:  # fmt: skip
    r = triton_export
    folder = r.path
    assert folder.name == "flowers" and r.details["name"] == "flowers"
    assert sorted(p.relative_to(folder).as_posix() for p in r.files) == [
        "1/model.onnx", "config.pbtxt", "labels.txt"]  # fmt: skip
    assert r.images_source == "the version's probe images" and r.check.passed
    assert len(r.check.images) == 8  # make_version's probes
    config = text_format.Parse(
        (folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == "flowers"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500
    (inp,) = config.input
    (out,) = config.output
    assert inp.name == "input" and inp.data_type == model_config_pb2.TYPE_FP32
    assert list(inp.dims) == [3, 64, 64] and inp.format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert out.name == "probabilities" and out.data_type == model_config_pb2.TYPE_FP32
    assert list(out.dims) == [10] and out.label_filename == "labels.txt"
    assert (folder / out.label_filename).read_text().splitlines() == LABELS
    # The model file's own signature is the config's (without the batch dimension).
    session = _session(folder / "1" / "model.onnx")
    (si,) = session.get_inputs()
    (so,) = session.get_outputs()
    assert (si.name, si.shape[1:]) == (inp.name, list(inp.dims))
    assert (so.name, so.shape[1:]) == (out.name, list(out.dims))
    got = _ort_probs(session, served.inputs[:4])
    assert float((got - served.probabilities[:4]).abs().max()) <= 1e-4


def test_a_failed_check_keeps_nothing(version: tuple[Path, ModelCard],
                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    real = E.pt2_runner

    def off_by_a_little(path: Path, card: ModelCard) -> E.Runner:
        run = real(path, card)
        return lambda x: run(x) + torch.full((len(x), card.num_classes), 2e-4)

    monkeypatch.setattr(E, "pt2_runner", off_by_a_little)
    with pytest.raises(E.ExportError, match=r"does not reproduce the model: a probability "
                       r"differs by 0\.0002 on probes/0\d\.png .*nothing was kept"):  # fmt: skip
        E.export_version(version[0], "pt2", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_export_is_replaced_only_with_force(tmp_path: Path) -> None:
    models = tmp_path / "models"
    card = make_version(models, version="plain")  # no probes: generated images check it
    out = tmp_path / "out"
    out.mkdir()
    (out / "plain.pt2").write_bytes(b"old")
    with pytest.raises(E.TargetExists, match=r"plain\.pt2 already exists"):
        E.export_version(models / card.version, "pt2", out)
    assert (out / "plain.pt2").read_bytes() == b"old"
    r = E.export_version(models / card.version, "pt2", out, force=True)
    assert r.images_source.startswith("generated images") and r.check.passed
    assert len(r.check.images) == 8 and sorted(out.iterdir()) == [out / "plain.pt2"]
    assert torch.export.load(out / "plain.pt2") is not None


def test_a_model_folder_is_swapped_whole(tmp_path: Path) -> None:
    old, new = tmp_path / "alexnet", tmp_path / ".tmp-new"
    (old / "1").mkdir(parents=True)
    (old / "1" / "model.onnx").write_bytes(b"old")
    (old / "stale.txt").write_text("x")
    (new / "1").mkdir(parents=True)
    (new / "1" / "model.onnx").write_bytes(b"new")
    E._move_into_place(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alexnet"]
    assert sorted(p.name for p in old.iterdir()) == ["1"]
    assert (old / "1" / "model.onnx").read_bytes() == b"new"


def test_missing_export_extra_is_named(version: tuple[Path, ModelCard],
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    for fmt in ("onnx", "triton"):
        with pytest.raises(E.MissingExtra) as info:
            E.export_version(version[0], fmt, tmp_path)
        assert info.value.modules == ["onnxruntime"] and info.value.fmt == fmt
    assert list(tmp_path.iterdir()) == []


def test_an_undecodable_check_image_is_named(version: tuple[Path, ModelCard],
                                             tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(E.ExportError, match=r"check image notes\.jpg: "):
        E.export_version(version[0], "pt2", tmp_path / "out",
                         check_images=[("notes.jpg", b"not an image")])  # fmt: skip
    assert list((tmp_path / "out").iterdir()) == []


def test_triton_refuses_what_it_cannot_write(
    version: tuple[Path, ModelCard], tmp_path: Path
) -> None:
    card = version[1]
    with pytest.raises(E.ExportError, match="line break"):
        E.triton_labels(card.model_copy(update={"labels": ["a", "b\nc", *LABELS[2:]]}))
    with pytest.raises(E.ExportError, match="invalid Triton model name"):
        E.export_version(version[0], "triton", tmp_path, name="../up")
