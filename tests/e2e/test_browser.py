"""The upload page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import Server
from tests.helpers.versions import make_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_upload_page_shows_top5_bars_and_errors(
    tmp_path: Path, browser: object, jpeg_photos: list[Path]
) -> None:
    home = tmp_path / "home"
    card = make_version(home / "models", activate=True)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    # every top-1 is below 1: each answer is "not sure", and the page says so
    with Server(home, ALEXNET_MIN_CONFIDENCE="1.0") as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        requests_outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(srv.url) or r.url.startswith("blob:")
                else requests_outside.append(r.url))  # fmt: skip
        page.goto(srv.url + "/")
        page.wait_for_selector(f"text=model {card.version}")
        assert "not calibrated" in page.inner_text("#model")
        page.set_input_files("#files", [str(jpeg_photos[0]), str(jpeg_photos[1]), str(bad)])
        page.wait_for_selector(".card.done >> nth=1", timeout=30_000)
        page.wait_for_selector(".card.failed", timeout=30_000)
        cards = page.query_selector_all(".card")
        assert len(cards) == 3
        done = page.query_selector_all(".card.done")
        for c in done:
            rows = c.query_selector_all(".row")
            assert len(rows) == 5
            assert all(r.get_attribute("data-label") in card.labels for r in rows)
            pct = [float(r.query_selector(".pct").inner_text().rstrip("%")) for r in rows]  # type: ignore[union-attr]
            assert pct == sorted(pct, reverse=True) and pct[0] > 0
            assert c.query_selector("img").evaluate("i => i.naturalWidth") > 0  # type: ignore[union-attr]
            unsure = c.query_selector(".unsure")
            assert unsure is not None and "not sure" in unsure.inner_text()
            assert "below 100%" in unsure.inner_text() and "uncertain" in (
                c.get_attribute("class") or ""
            )
        failed = page.query_selector(".card.failed .error")
        assert failed is not None and "unsupported_media_type" in failed.inner_text()
        assert requests_outside == []  # no CDN, works offline
        page.screenshot(path=str(tmp_path / "upload-page.png"), full_page=True)
        page.close()


def test_admin_section_trains_and_activates(tmp_path: Path, browser: object) -> None:
    home = tmp_path / "home"
    old = make_version(home / "models", activate=True, metrics={"val_top1": 0.1})
    token = "browser-admin-token"
    with Server(home, ALEXNET_ADMIN_TOKEN=token, ALEXNET_JOB_THREADS="1") as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(srv.url + "/")
        # A wrong token is refused in the page, in the API's words.
        page.fill("#token", "wrong")
        page.click("#token-form button")
        page.wait_for_selector("#admin-msg.error >> text=unauthorized")
        assert page.is_hidden("#admin-body")
        page.fill("#token", token)
        page.click("#token-form button")
        page.wait_for_selector(f"#versions tr[data-version='{old.version}'] >> text=serving")

        def start(fields: dict[str, str]) -> None:
            for name, value in fields.items():
                page.fill(f"#job-form [name={name}]", value)
            page.select_option("#job-form [name=activate]", "always")
            page.click("#job-form button")
            page.wait_for_selector("#admin-msg >> text=queued")

        # Live progress while a job runs (one long enough to be seen running on any
        # machine), and its Cancel button.
        start({"dataset": "synthetic:4000", "epochs": "3", "image_size": "64", "batch_size": "16"})
        page.wait_for_selector("#jobs tr[data-status=running] progress", timeout=60_000)
        page.click("#jobs tr[data-status=running] button.cancel")
        page.wait_for_selector("#jobs tr[data-status=cancelled] button.resume", timeout=60_000)
        # A short job to the end: the result, its loss plot and the new version.
        start({"dataset": "synthetic:160", "epochs": "2", "image_size": "64", "batch_size": "16"})
        page.wait_for_selector("#jobs tr[data-status=succeeded]", timeout=120_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#jobs img.losses')].some(i => i.naturalWidth > 0)",
            timeout=15_000,
        )
        job_row = page.query_selector("#jobs tr[data-status=succeeded]")
        assert job_row is not None and "activated" in job_row.inner_text()
        new_version = page.eval_on_selector(
            "#versions tbody tr:first-child", "tr => tr.dataset.version"
        )
        assert new_version != old.version
        page.wait_for_selector(f"#versions tr[data-version='{new_version}'] >> text=serving")
        page.wait_for_selector(f"text=model {new_version}")  # the header follows the job
        # Roll back with the button; the header follows the served version.
        page.click(f"#versions tr[data-version='{old.version}'] button.activate")
        page.wait_for_selector(f"#versions tr[data-version='{old.version}'] >> text=serving")
        page.wait_for_selector(f"text=model {old.version}")
        page.screenshot(path=str(tmp_path / "admin-section.png"), full_page=True)
        page.close()


def offline(page: object, srv: Server) -> list[str]:
    """Abort every request the page makes to anywhere but the local server (as if the
    machine had no network); the aborted URLs are collected in the returned list."""
    outside: list[str] = []

    def handle(route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        if url.startswith(srv.url + "/"):
            route.continue_()  # type: ignore[attr-defined]
        else:
            outside.append(url)
            route.abort()  # type: ignore[attr-defined]

    page.route("**/*", handle)  # type: ignore[attr-defined]
    return outside


def test_docs_pages_work_offline_and_try_it_out_classifies(
    tmp_path: Path, browser: object, jpeg_photos: list[Path]
) -> None:
    home = tmp_path / "home"
    make_version(home / "models", activate=True)
    with Server(home) as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        outside = offline(page, srv)
        problems: list[str] = []  # uncaught errors, and what the page's CSP refused
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.goto(srv.url + "/docs")
        op = page.locator("#operations-classify-classify_v1_classify_post")
        op.locator(".opblock-summary").wait_for(timeout=30_000)
        for summary in ("Classify one image", "Every version with its metrics",
                        "Start a training job"):  # fmt: skip
            assert page.get_by_text(summary).first.is_visible()
        op.locator(".opblock-summary").click()
        op.locator("button.try-out__btn").click()
        op.locator("input[type=file]").set_input_files(str(jpeg_photos[0]))
        op.locator("button.execute").click()
        live = op.locator(".live-responses-table .response")
        live.first.wait_for(timeout=30_000)
        assert live.first.locator(".response-col_status").inner_text().strip() == "200"
        assert '"predictions"' in live.first.locator(".response-col_description").inner_text()
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)

        page.goto(srv.url + "/redoc")
        # ReDoc's middle panel: one heading per operation, under its own summary.
        page.get_by_role("heading", name="Classify one image").wait_for(timeout=30_000)
        assert page.get_by_role("heading", name="Every version with its metrics").is_visible()
        page.screenshot(path=str(tmp_path / "redoc.png"))
        assert outside == []  # no CDN, no Google Fonts
        # Only ReDoc's own CDN logo, refused by the docs pages' CSP before any request.
        assert all("cdn.redoc.ly/redoc/logo-mini.svg" in p for p in problems), problems
        page.close()


def test_small_model_gets_every_class_and_non_images_a_placeholder(
    tmp_path: Path, browser: object, jpeg_photos: list[Path]
) -> None:
    """A 4-class model: the page asks for the API's default top_k (not 5, which would be
    a 422 for every file), and a text file shows its own error with no broken <img>."""
    home = tmp_path / "home"
    card = make_version(home / "models", num_classes=4, activate=True)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with Server(home) as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        outside = offline(page, srv)
        page.goto(srv.url + "/")
        page.wait_for_selector(f"text=model {card.version}")
        page.set_input_files("#files", [str(jpeg_photos[0]), str(bad)])
        page.wait_for_selector(".card.done", timeout=30_000)
        page.wait_for_selector(".card.failed .thumb", timeout=30_000)
        done = page.locator(".card.done")
        assert done.locator(".row").count() == 4
        error = page.locator(".card.failed .error").inner_text()
        assert error.split(":")[0] in ("unsupported_media_type", "invalid_image"), error
        assert "top_k" not in error
        assert "notes.txt" in page.locator(".card.failed .thumb").inner_text()
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        widths = page.evaluate("() => [...document.images].map(i => i.naturalWidth)")
        assert widths and 0 not in widths  # the photo's thumbnail, and no broken image
        # The cards sit below the drop zone, which sits below the header: no overlap.
        header = page.locator("header").bounding_box()
        drop = page.locator("#drop").bounding_box()
        first = page.locator(".card").first.bounding_box()
        assert header and drop and first
        assert header["y"] + header["height"] <= drop["y"]
        assert drop["y"] + drop["height"] <= first["y"]
        assert page.get_attribute("link[rel=icon]", "href") == "/favicon.ico"
        assert outside == []
        page.screenshot(path=str(tmp_path / "small-model.png"), full_page=True)
        page.close()


def test_header_follows_a_version_activated_elsewhere(tmp_path: Path, browser: object) -> None:
    home = tmp_path / "home"
    old = make_version(home / "models", activate=True)
    new = make_version(home / "models", seed=1)
    token = "browser-admin-token"
    with Server(home, ALEXNET_ADMIN_TOKEN=token) as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(srv.url + "/")
        page.wait_for_selector(f"text=model {old.version}")
        # The training form's default image size is the one that learns at a useful rate.
        assert page.input_value("#job-form [name=image_size]") == "128"
        # Another client (the CLI, a script, another tab) activates a version; the page
        # has no admin token and never asked, yet its header follows within its poll.
        r = httpx.post(f"{srv.url}/admin/models/{new.version}/activate",
                       headers={"Authorization": f"Bearer {token}"}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        page.wait_for_selector(f"text=model {new.version}", timeout=30_000)
        page.close()


def test_admin_section_uploads_a_dataset_and_fine_tunes_from_it(
    tmp_path: Path, browser: object
) -> None:
    from tests.helpers.datasets import shape_images, zip_bytes

    home = tmp_path / "home"
    served = make_version(home / "models", activate=True, image_size=64,
                          labels=["circle", "square", "triangle"])  # fmt: skip
    archive = tmp_path / "shapes.zip"
    archive.write_bytes(zip_bytes(shape_images(3, 12, prefix="shapes/") | {"shapes/a.txt": b"x"}))
    token = "browser-admin-token"
    with Server(home, ALEXNET_ADMIN_TOKEN=token, ALEXNET_JOB_THREADS="1") as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(srv.url + "/")
        page.fill("#token", token)
        page.click("#token-form button")
        page.wait_for_selector("#admin-body:not([hidden])")
        page.set_input_files("#ds-file", str(archive))
        page.fill("#ds-name", "shapes")
        page.click("#ds-form button")
        page.wait_for_selector("#ds-report >> text=imported shapes: 3 classes, 36 images")
        assert "shapes/a.txt: not an image" in page.inner_text("#ds-report .skipped")
        page.wait_for_selector("#datasets tr[data-dataset=shapes]")
        assert "circle 12" in page.inner_text("#datasets tr[data-dataset=shapes]")
        # Uploading it again is refused, in the API's words
        page.click("#ds-form button")
        page.wait_for_selector("#ds-report .error >> text=conflict")
        # Fine-tune from the served version: a linear probe, judged on the holdout
        for name, value in {"epochs": "1", "batch_size": "16", "dropout": "0"}.items():
            page.fill(f"#job-form [name={name}]", value)
        page.select_option("#job-form [name=freeze]", "all-but-head")
        page.click("#datasets tr[data-dataset=shapes] button.fine-tune")
        page.wait_for_selector("#admin-msg >> text=queued")
        page.wait_for_selector("#jobs tr[data-status=succeeded] .promotion", timeout=180_000)
        line = page.inner_text("#jobs tr[data-status=succeeded] .promotion")
        assert "holdout top-1" in line and f"served {served.version}" in line, line
        assert "on 6 images" in line and "p=" in line
        page.screenshot(path=str(tmp_path / "datasets-section.png"), full_page=True)
        page.close()


def test_feedback_on_the_page_right_wrong_live_accuracy_review_and_retrain(
    tmp_path: Path, browser: object
) -> None:
    from tests.helpers.datasets import shape_images

    home = tmp_path / "home"
    labels = ["circle", "square", "triangle"]
    served = make_version(home / "models", activate=True, image_size=64, labels=labels)
    files = []
    for name, data in sorted(shape_images(3, 1).items()):
        files.append(tmp_path / name.replace("/", "-"))
        files[-1].write_bytes(data)
    token = "browser-admin-token"
    env = {"ALEXNET_ADMIN_TOKEN": token, "ALEXNET_JOB_THREADS": "1", "ALEXNET_FEEDBACK": "true",
           "ALEXNET_HOLDOUT_SPLIT": "0.01"}  # fmt: skip
    with Server(home, **env) as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(srv.url + "/")
        page.wait_for_selector(f"text=model {served.version}")
        page.set_input_files("#files", [str(f) for f in files[:2]])
        page.wait_for_selector(".card.done >> nth=1", timeout=30_000)
        first, second = page.query_selector_all(".card.done")
        first.query_selector("button.right").click()  # type: ignore[union-attr]
        page.wait_for_selector(".card.done >> nth=0 >> .fb[data-sent]")
        top1 = second.query_selector(".row").get_attribute("data-label")  # type: ignore[union-attr]
        other = next(lab for lab in labels if lab != top1)
        second.query_selector("button.wrong").click()  # type: ignore[union-attr]
        second.query_selector("input.pick").fill(other)  # type: ignore[union-attr]
        second.query_selector("button.send").click()  # type: ignore[union-attr]
        page.wait_for_selector(f".card.done >> nth=1 >> .fb[data-sent={other}]")
        assert "thanks: " + other in second.inner_text()

        page.fill("#token", token)
        page.click("#token-form button")
        page.wait_for_selector("#feedback:not([hidden])")
        cell = page.wait_for_selector(f"#live tr[data-version='{served.version}'] .top1")
        assert cell.inner_text().startswith("50.0%")  # type: ignore[union-attr]
        assert page.inner_text("#confusions tbody").split() == [top1, other, "1"]
        fig = page.wait_for_selector("#review figure img[src^='blob:']")
        assert fig.evaluate("i => i.naturalWidth") > 0  # type: ignore[union-attr]
        page.fill("#job-form [name=epochs]", "1")
        page.click("#retrain")
        page.wait_for_selector("#admin-msg >> text=retrain from feedback")
        page.wait_for_selector("#jobs >> text=feedback:job-")
        page.screenshot(path=str(tmp_path / "feedback-section.png"), full_page=True)
        page.close()
