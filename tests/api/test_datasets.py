"""/admin/datasets through the app in-process: import (raw body and multipart; the three
layouts), list, show, delete, 409s, and every hostile archive the issue names, each a clear
4xx in the error envelope with nothing written. Also /admin/models/{version}/evaluate."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.datasets import DatasetStore
from tests.helpers.api import assert_error, make_client, wait_ready
from tests.helpers.datasets import shape_images, tar_bytes, tar_entry, zip_bytes
from tests.helpers.disks import small_tmpfs
from tests.helpers.versions import make_version

TOKEN = "datasets-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ZIP = {**AUTH, "Content-Type": "application/zip"}
TGZ = {**AUTH, "Content-Type": "application/gzip"}
CLASSES = ["circle", "square", "triangle"]  # the first three built-in shapes, sorted


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("datasets-home")


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[TestClient]:
    # A version with the datasets' labels (for /evaluate); jobs are only queued, not run.
    make_version(home / "models", activate=True, labels=CLASSES)
    # Stale leftovers of a killed server: removed at startup.
    (home / "data" / ".tmp-import-old-0badc0de" / "circle").mkdir(parents=True)
    (home / "data" / ".tmp-upload-0badc0de").write_bytes(b"partial")
    with make_client(home, admin_token=TOKEN, run_jobs=False, watch_active_s=0,
                     max_dataset_bytes=16 * 1024 * 1024, max_upload_bytes=1024 * 1024) as c:  # fmt: skip
        wait_ready(c)
        yield c


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "data").glob(".tmp-*"))


def names(client: TestClient) -> list[str]:
    r = client.get("/admin/datasets", headers=AUTH)
    assert r.status_code == 200, r.text
    return [d["name"] for d in r.json()["datasets"]]


def test_startup_removed_what_a_killed_import_left(client: TestClient, home: Path) -> None:
    assert leftovers(home) == []


def test_import_a_zip_of_class_folders_under_one_top_folder(client: TestClient) -> None:
    files = shape_images(3, 10, prefix="shapes/")
    files |= {"shapes/notes.txt": b"not an image", "shapes/circle/broken.jpg": b"\xff\xd8\xff junk",
              "__MACOSX/shapes/._x.jpg": b"meta", "shapes/README": b"hello"}  # fmt: skip
    r = client.post("/admin/datasets/shapes", headers=ZIP, content=zip_bytes(files))
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["name"] == "shapes" and d["spec"] == "imagefolder:shapes"
    assert d["classes"] == CLASSES and d["images"] == 30 and d["layout"] == "class_folders"
    # 15% of each class of 10, seeded: 2 per class; the rest is what jobs split
    assert d["splits"] == {"trainval": 24, "holdout": 6}
    assert all(per == {"trainval": 8, "holdout": 2} for per in d["per_class"].values())
    assert d["holdout"] == {"share": 0.15, "seed": 0, "from": "drawn", "images": 6,
                            "hash": d["holdout"]["hash"]}  # fmt: skip
    assert len(d["holdout"]["hash"]) == 64 and d["holdout"]["hash"] != d["hash"]
    skipped = {s["path"]: s["reason"] for s in d["skipped"]}
    assert set(skipped) == {"shapes/notes.txt", "shapes/circle/broken.jpg",
                            "__MACOSX/shapes/._x.jpg", "shapes/README"}  # fmt: skip
    assert "not an image" in skipped["shapes/notes.txt"]
    assert len(d["hash"]) == 64 and d["bytes"] > 0 and d["source"].startswith("upload")
    # Listed and shown; the same files as a tar.gz through the page's multipart field give
    # the same content hash and the same holdout
    assert "shapes" in names(client)
    shown = client.get("/admin/datasets/shapes", headers=AUTH).json()
    assert shown["hash"] == d["hash"] and shown["skipped"] == d["skipped"]
    good = {k: v for k, v in files.items() if k.endswith((".png", ".jpg")) and "broken" not in k
            and "MACOSX" not in k}  # fmt: skip
    r = client.post("/admin/datasets/shapes-again", headers=AUTH,
                    files={"file": ("shapes.tar.gz", tar_bytes(good), "application/gzip")})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["hash"] == d["hash"] and r.json()["per_class"] == d["per_class"]
    assert r.json()["holdout"] == d["holdout"]
    assert r.json()["source"] == "upload shapes.tar.gz"


def test_a_pre_split_archive_keeps_its_split(client: TestClient) -> None:
    files = (shape_images(2, 6, prefix="train/") | shape_images(2, 2, prefix="val/", seed=9)
             | shape_images(2, 3, prefix="test/", seed=11))  # fmt: skip
    r = client.post("/admin/datasets/presplit", headers=TGZ, content=tar_bytes(files))
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["layout"] == "pre_split" and d["classes"] == ["circle", "triangle"]
    assert d["splits"] == {"train": 12, "val": 4, "holdout": 6}
    assert d["holdout"]["from"] == "test folder"


def test_an_existing_name_is_409_unless_replaced(client: TestClient) -> None:
    body = zip_bytes(shape_images(2, 4))
    assert client.post("/admin/datasets/twice", headers=ZIP, content=body).status_code == 201
    first = client.get("/admin/datasets/twice", headers=AUTH).json()
    err = assert_error(client.post("/admin/datasets/twice", headers=ZIP, content=body), 409,
                       "conflict")  # fmt: skip
    assert "replace=true" in str(err["message"])
    r = client.post("/admin/datasets/twice?replace=true", headers=ZIP,
                    content=zip_bytes(shape_images(3, 4)))  # fmt: skip
    assert r.status_code == 201 and r.json()["hash"] != first["hash"]
    assert client.get("/admin/datasets/twice", headers=AUTH).json()["num_classes"] == 3


def test_an_import_under_way_makes_a_second_one_409(client: TestClient, home: Path) -> None:
    # What a concurrent upload of the same name holds while it extracts (the e2e suite
    # races two real uploads).
    with DatasetStore(home / "data").lock("racing"):
        r = client.post(
            "/admin/datasets/racing", headers=ZIP, content=zip_bytes(shape_images(2, 4))
        )
        assert "being imported" in str(assert_error(r, 409, "conflict")["message"])
    assert "racing" not in names(client) and leftovers(home) == []


def _zip_with_raw_name(placeholder: str, raw: bytes, files: dict[str, bytes]) -> bytes:
    body = zip_bytes({**files, placeholder: b"\x89PNG"}, compression=zipfile.ZIP_STORED)
    assert len(raw) == len(placeholder.encode())
    return body.replace(placeholder.encode(), raw)


def _pax_path(path: str) -> bytes:
    """A tar whose PAX header names a member with `path` (a ustar name cannot hold a NUL;
    a PAX record can)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in GOOD.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("circle/x.png")
        info.size, info.pax_headers = len(PNG), {"path": path}
        tf.addfile(info, io.BytesIO(PNG))
    return buf.getvalue()


def _bomb() -> bytes:
    # 20 "images" of 1 MiB of zeros: 20 MiB unpacked from ~20 KB, past the 16 MiB limit
    return zip_bytes({f"a/{i}.png": bytes(1024 * 1024) for i in range(20)} | shape_images(2, 2))


def _many_members() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(100_000):
            zf.writestr(f"c/{i}", b"")
    return buf.getvalue()


def _duplicate() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in shape_images(2, 2).items():
            zf.writestr(name, data)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("circle/000.jpg", b"again")
    return buf.getvalue()


def _tar_bomb() -> bytes:
    # 40 MiB of zeros in a hidden member nobody reads, ~40 KB gzipped: tarfile would
    # decompress it silently on its way to the next header
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(".junk")
        info.size = 40 * 1024 * 1024
        tf.addfile(info, io.BytesIO(bytes(info.size)))
        for name, data in shape_images(2, 2).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _encrypted_zip() -> bytes:
    data = bytearray(zip_bytes(shape_images(2, 3), compression=zipfile.ZIP_STORED))
    for sig, flags_at in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):
        i = data.find(sig)
        data[i + flags_at] |= 0x1  # "encrypted"
    return bytes(data)


def _cut_tar(extra: bytes) -> bytes:
    """A plain tar cut 100 bytes into its second header, then `extra`."""
    raw = tar_bytes(shape_images(2, 3), mode="w")
    first = len(next(iter(shape_images(2, 3).values())))
    cut = 512 + -(-first // 512) * 512 + 100
    return raw[:cut] + extra


def _corrupt(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 64]) + data[mid + 64 :]


GOOD = shape_images(2, 3)
ONE_CLASS = {k: v for k, v in shape_images(2, 3).items() if k.startswith("circle/")}
BROKEN_CLASS = {**ONE_CLASS, "square/0.jpg": b"\xff\xd8 not really", "square/1.png": b"\x89PNG no"}
PNG = next(iter(GOOD.values()))
GOOD_BIG = shape_images(2, 8)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code", "needle"),
    [
        pytest.param(_bomb(), "application/zip", 413, "payload_too_large", "unpacks to more",
                     id="zip-bomb"),
        pytest.param(_many_members(), "application/zip", 413, "too_many_files", "100000 members",
                     id="100000-members"),
        pytest.param(_tar_bomb(), "application/gzip", 413, "payload_too_large", "unpacks to more",
                     id="tar-gz-bomb"),
        pytest.param(_encrypted_zip(), "application/zip", 400, "invalid_archive", "encrypted",
                     id="encrypted-zip"),
        pytest.param(_cut_tar(b""), "application/x-tar", 400, "invalid_archive", "truncated",
                     id="tar-cut-in-a-header"),
        pytest.param(_cut_tar(b"x" * 1024), "application/x-tar", 400, "invalid_archive",
                     "garbage", id="tar-with-garbage"),
        pytest.param(_corrupt(tar_bytes(GOOD_BIG, mode="w:xz")), "application/x-xz", 400,
                     "invalid_archive", "cannot be read", id="corrupt-xz"),
        pytest.param(_corrupt(tar_bytes(GOOD_BIG, mode="w:bz2")), "application/x-bzip2", 400,
                     "invalid_archive", "cannot be read", id="corrupt-bz2"),
        pytest.param(tar_bytes(GOOD)[:-4], "application/gzip", 400, "invalid_archive",
                     "cannot be read", id="gzip-trailer-cut"),
        pytest.param(zip_bytes({**GOOD, "../evil/x.png": PNG}), "application/zip", 400,
                     "invalid_archive", "leaves the dataset", id="dot-dot"),
        pytest.param(zip_bytes({**GOOD, "circle/../../x.png": PNG}), "application/zip", 400,
                     "invalid_archive", "leaves the dataset", id="dot-dot-inside"),
        pytest.param(tar_bytes({**GOOD, "/etc/x.png": PNG}), "application/gzip", 400,
                     "invalid_archive", "absolute path", id="absolute"),
        pytest.param(zip_bytes({**GOOD, "C:/x/y.png": PNG}), "application/zip", 400,
                     "invalid_archive", "absolute path", id="drive-letter"),
        pytest.param(zip_bytes({**GOOD, "circle\\..\\..\\x.png": PNG}), "application/zip", 400,
                     "invalid_archive", "backslash", id="backslashes"),
        pytest.param(_zip_with_raw_name("circle/aQb.png", b"circle/a\x00b.png", GOOD),
                     "application/zip", 400, "invalid_archive", "NUL", id="nul-zip"),
        pytest.param(_pax_path("circle/a\x00../../b.png"), "application/x-tar", 400,
                     "invalid_archive", "NUL", id="nul-tar-pax"),
        pytest.param(tar_bytes({**GOOD, "circle/a\x01b.png": PNG}), "application/gzip", 400,
                     "invalid_archive", "control character", id="control-character"),
        pytest.param(tar_bytes({**GOOD, "circle/a\nb.png": PNG}), "application/gzip", 400,
                     "invalid_archive", "control character", id="newline"),
        pytest.param(_zip_with_raw_name("circle/QQ.png", b"circle/\xff\xfe.png", GOOD),
                     "application/zip", 400, "invalid_archive", "not valid UTF-8", id="bad-utf8"),
        pytest.param(tar_bytes(GOOD, extra=[tar_entry("circle/l.png", tarfile.SYMTYPE, "/etc/passwd")]),
                     "application/gzip", 400, "invalid_archive", "a link", id="symlink"),
        pytest.param(tar_bytes(GOOD, extra=[tar_entry("circle/h.png", tarfile.LNKTYPE, "circle/000.jpg")]),
                     "application/gzip", 400, "invalid_archive", "a link", id="hard-link"),
        pytest.param(tar_bytes(GOOD, extra=[tar_entry("circle/dev", tarfile.CHRTYPE)]),
                     "application/gzip", 400, "invalid_archive", "device", id="device"),
        pytest.param(tar_bytes(GOOD, extra=[tar_entry("circle/fifo", tarfile.FIFOTYPE)]),
                     "application/gzip", 400, "invalid_archive", "FIFO", id="fifo"),
        pytest.param(_duplicate(), "application/zip", 400, "invalid_archive", "appears twice",
                     id="duplicate"),
        pytest.param(zip_bytes({**GOOD, "circle/more.zip": zip_bytes(GOOD)}), "application/zip",
                     400, "invalid_archive", "archive inside", id="nested-archive"),
        pytest.param(zip_bytes({**GOOD, "circle/more.jpg": zip_bytes(GOOD)}), "application/zip",
                     400, "invalid_archive", "archive inside", id="nested-archive-renamed"),
        pytest.param(zip_bytes(BROKEN_CLASS), "application/zip", 422, "validation_error",
                     "class 'square' has no readable images", id="class-all-broken"),
        pytest.param(zip_bytes(ONE_CLASS), "application/zip", 422, "validation_error",
                     "at least 2", id="one-class"),
        pytest.param(zip_bytes({}), "application/zip", 422, "validation_error",
                     "no readable images", id="empty-archive"),
        pytest.param(tar_bytes({}), "application/gzip", 422, "validation_error",
                     "no readable images", id="empty-tar"),
        pytest.param(os.urandom(4096), "application/zip", 415, "unsupported_media_type",
                     "not a zip, tar", id="not-an-archive"),
        pytest.param(PNG, "application/octet-stream", 415, "unsupported_media_type",
                     "not a zip, tar", id="an-image"),
        pytest.param(zip_bytes(GOOD)[:-200], "application/zip", 400, "invalid_archive",
                     "zip", id="truncated-zip"),
        pytest.param(tar_bytes(GOOD)[:-300], "application/gzip", 400, "invalid_archive",
                     "truncated", id="truncated-gzip"),
        pytest.param(b"hello=world", "application/x-www-form-urlencoded", 415,
                     "unsupported_media_type", "not a zip, tar", id="a-form"),
    ],
)  # fmt: skip
def test_a_bad_archive_is_refused_and_nothing_is_written(
    client: TestClient, home: Path, body: bytes, ctype: str, status: int, code: str, needle: str
) -> None:
    r = client.post("/admin/datasets/bad", headers={**AUTH, "Content-Type": ctype}, content=body)
    err = assert_error(r, status, code)
    assert needle in str(err["message"]), err
    assert "bad" not in names(client)
    assert not (home / "data" / "bad").exists() and leftovers(home) == []


def test_a_body_over_the_limit_is_413_before_it_is_read(client: TestClient) -> None:
    r = client.post("/admin/datasets/big", headers={**ZIP, "Content-Length": str(17 * 1024 * 1024)},
                    content=b"PK\x03\x04" + bytes(17 * 1024 * 1024 - 4))  # fmt: skip
    assert_error(r, 413, "payload_too_large")


def test_names_and_auth(client: TestClient) -> None:
    body = zip_bytes(GOOD)
    assert_error(client.post("/admin/datasets/shapes", content=body), 401, "unauthorized")
    for bad in ("..", ".hidden", "a" * 65, "cifar10", "-x"):
        r = client.post(f"/admin/datasets/{bad}", headers=ZIP, content=body)
        assert r.status_code in (404, 422), (bad, r.text)  # (.. never reaches the route)
    # The bytes decide, not the Content-Type: curl --data-binary's default type is fine
    r = client.post("/admin/datasets/curl-default", content=body,
                    headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 201, r.text
    assert_error(client.get("/admin/datasets/nope", headers=AUTH), 404, "not_found")
    assert_error(client.delete("/admin/datasets/nope", headers=AUTH), 404, "not_found")


def test_delete_is_refused_while_a_job_uses_it(client: TestClient, home: Path) -> None:
    assert client.post("/admin/datasets/used", headers=ZIP,
                       content=zip_bytes(shape_images(2, 6))).status_code == 201  # fmt: skip
    job = client.post("/admin/jobs", headers=AUTH,
                      json={"dataset": "imagefolder:used", "epochs": 1, "image_size": 64}).json()  # fmt: skip
    assert job["status"] == "queued"
    err = assert_error(client.delete("/admin/datasets/used", headers=AUTH), 409, "conflict")
    assert job["id"] in str(err["message"])
    r = client.post("/admin/datasets/used?replace=true", headers=ZIP, content=zip_bytes(GOOD))
    assert_error(r, 409, "conflict")
    assert client.delete(f"/admin/jobs/{job['id']}", headers=AUTH).json()["status"] == "cancelled"
    r = client.delete("/admin/datasets/used", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] == "used" and r.json()["freed_bytes"] > 0
    assert "used" not in names(client) and not (home / "data" / "used").exists()
    assert leftovers(home) == []
    err = assert_error(client.post("/admin/jobs", headers=AUTH,
                                   json={"dataset": "imagefolder:used"}), 422, "validation_error")  # fmt: skip
    assert "POST /admin/datasets/used" in str(err["message"])


def test_a_folder_made_by_hand_gets_its_manifest_at_first_use(
    client: TestClient, home: Path
) -> None:
    folder = home / "data" / "byhand"
    for name, data in shape_images(2, 7).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    listed = {d["name"]: d for d in client.get("/admin/datasets", headers=AUTH).json()["datasets"]}
    assert listed["byhand"]["manifest"] is False
    d = client.get("/admin/datasets/byhand", headers=AUTH).json()
    assert d["images"] == 14 and d["splits"] == {"trainval": 12, "holdout": 2}
    assert d["source"] == "folder made by hand" and (folder / "manifest.json").is_file()
    again = client.get("/admin/datasets/byhand", headers=AUTH).json()
    assert again["hash"] == d["hash"] and again["created_at"] == d["created_at"]  # frozen


def test_evaluate_a_version_on_a_holdout(client: TestClient) -> None:
    active = client.get("/v1/models/active").json()["version"]
    r = client.post(f"/admin/models/{active}/evaluate", headers=AUTH,
                    json={"dataset": "imagefolder:shapes", "split": "holdout"})  # fmt: skip
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["split"] == "holdout" and rep["count"] == 6 and rep["labels"] == CLASSES
    assert 0 <= rep["top1"] <= 1 and sum(map(sum, rep["confusion_matrix"])) == 6
    assert rep["includes_training_images"] is False and rep["device"] == "cpu"
    r = client.post(f"/admin/models/{active}/evaluate", headers=AUTH,
                    json={"dataset": "imagefolder:shapes", "split": "val"})  # fmt: skip
    assert r.status_code == 200 and r.json()["count"] > 0
    # other labels, unknown datasets and versions
    err = assert_error(client.post(f"/admin/models/{active}/evaluate", headers=AUTH,
                                   json={"dataset": "imagefolder:presplit"}), 422, "validation_error")  # fmt: skip
    assert "labels" in str(err["message"])
    assert_error(client.post(f"/admin/models/{active}/evaluate", headers=AUTH,
                             json={"dataset": "imagefolder:nope"}), 422, "validation_error")  # fmt: skip
    assert_error(
        client.post("/admin/models/v404/evaluate", headers=AUTH, json={}), 404, "not_found"
    )
    assert_error(client.post(f"/admin/models/{active}/evaluate", headers=AUTH,
                             json={"split": "train"}), 422, "validation_error")  # fmt: skip


@pytest.fixture
def small_data_disk(tmp_path: Path) -> Iterator[Path]:
    """A home whose data dir is a 1 MB tmpfs."""
    with small_tmpfs(tmp_path / "data", "1m"):
        yield tmp_path


def test_the_disk_filling_up_during_extraction_is_507_and_leaves_nothing(
    small_data_disk: Path,
) -> None:
    # BMPs: ~15 KB each unpacked, a few hundred bytes deflated: the archive fits, its
    # contents (~2 MB) do not
    from PIL import Image

    files = {}
    for i in range(140):
        buf = io.BytesIO()
        Image.new("RGB", (72, 72), (i, 2 * i % 256, 90)).save(buf, format="BMP")
        files[f"{'ab'[i % 2]}/{i}.bmp"] = buf.getvalue()
    body = zip_bytes(files)
    assert len(body) < 200_000
    home = small_data_disk
    with make_client(home, admin_token=TOKEN, run_jobs=False, watch_active_s=0) as c:
        r = c.post("/admin/datasets/full", headers=ZIP, content=body)
        err = assert_error(r, 507, "insufficient_storage")
        assert "filled up" in str(err["message"])
        assert not (home / "data" / "full").exists() and leftovers(home) == []
        # the space is back: a small dataset still goes in
        assert (
            c.post("/admin/datasets/fits", headers=ZIP, content=zip_bytes(GOOD)).status_code == 201
        )
