"""The upload page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_version
from tests.e2e.server import Server

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
    with Server(home) as srv:
        page = browser.new_page()  # type: ignore[attr-defined]
        requests_outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(srv.url) or r.url.startswith("blob:")
                else requests_outside.append(r.url))  # fmt: skip
        page.goto(srv.url + "/")
        page.wait_for_selector(f"text=model {card.version}")
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
        for name, value in {"dataset": "synthetic:160", "epochs": "2", "image_size": "64",
                            "batch_size": "16"}.items():  # fmt: skip
            page.fill(f"#job-form [name={name}]", value)
        page.select_option("#job-form [name=activate]", "always")
        page.click("#job-form button")
        page.wait_for_selector("#admin-msg >> text=queued")
        # Live progress while it runs, then the result, its loss plot and the new version.
        page.wait_for_selector("#jobs tr[data-status=running] progress", timeout=60_000)
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
        # Roll back with the button; the header follows the served version.
        page.click(f"#versions tr[data-version='{old.version}'] button.activate")
        page.wait_for_selector(f"#versions tr[data-version='{old.version}'] >> text=serving")
        page.wait_for_selector(f"text=model {old.version}")
        page.screenshot(path=str(tmp_path / "admin-section.png"), full_page=True)
        page.close()
