"""The web page in headless Chromium against the real service with the tiny models.

The tests run in order on one browser tab: enter the API key (a wrong one first), build a dataset
from loopback URLs and a zip, caption and edit it, then train from the form, watch, reload, cancel
and download. Screenshots for the README are written when FLUXTRAIN_SCREENSHOTS names a folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.datasets.support import LoopbackServer, Reply, encode
from tests.web.conftest import API_KEY, TRAIN_DATASET, Service

pytestmark = pytest.mark.timeout(300)
SCREENSHOTS = os.environ.get("FLUXTRAIN_SCREENSHOTS")
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


class Tab:
    """One browser tab and every console error and uncaught exception it had."""

    def __init__(self, page: object) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.resumed_from: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("request", self._seen)
        page.on("dialog", lambda dialog: dialog.accept())

    def _seen(self, request: object) -> None:
        self.requests.append(request.url)
        if "last-event-id" in request.headers:
            self.resumed_from.append(request.headers["last-event-id"])

    def shot(self, name: str, *, full_page: bool = False) -> None:
        """Save a screenshot as a small palette PNG (for docs/), when FLUXTRAIN_SCREENSHOTS is set."""
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            with Image.open(io.BytesIO(self.page.screenshot(full_page=full_page))) as shot:
                shot.convert("RGB").quantize(colors=128).save(Path(SCREENSHOTS) / name, optimize=True)

    def take_errors(self) -> list[str]:
        taken, self.errors[:] = list(self.errors), []
        return taken


@pytest.fixture(scope="module")
def tab(browser: object, service: Service) -> Iterator[Tab]:
    context = browser.new_context(viewport=WIDE, accept_downloads=True)
    context.set_default_timeout(60_000)
    opened = Tab(context.new_page())
    yield opened
    context.close()


def _status_of_resource(errors: list[str], code: int) -> bool:
    return bool(errors) and all(f"status of {code}" in error for error in errors)


def test_the_key_is_asked_once_and_a_wrong_one_is_refused_plainly(tab: Tab, service: Service) -> None:
    page = tab.page
    page.goto(service.url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", "wrong-key")
    page.keyboard.press("Enter")
    page.locator("#key-message").filter(has_text="refused").wait_for()
    assert dialog.is_visible()
    assert _status_of_resource(tab.take_errors(), 401)
    page.fill("#key-input", API_KEY)
    page.keyboard.press("Enter")
    page.locator("h1", has_text="Datasets").wait_for()
    assert not dialog.is_visible()
    assert page.evaluate("sessionStorage.getItem('fluxtrain.apiKey')") == API_KEY
    page.reload()
    page.locator("h1", has_text="Datasets").wait_for()
    assert not dialog.is_visible()
    assert page.locator("table.list", has_text=TRAIN_DATASET).is_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(3):
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Train"
    page.keyboard.press("Enter")
    page.locator("h1", has_text="Train a LoRA").wait_for()


def test_dataset_from_urls_and_a_zip_captioned_and_edited(
    tab: Tab, service: Service, images: LoopbackServer, tmp_path: Path
) -> None:
    page = tab.page
    urls = [
        images.add(f"/pet{i}.png", Reply(body=encode(Image.new("RGB", (96, 80), c), "PNG")))
        for i, c in enumerate([(220, 40, 40), (40, 40, 220)])
    ]
    missing = images.url("/gone.png")
    page.goto(service.url + "/#/datasets")
    page.fill("#new-name", "pets")
    page.fill("#new-urls", "\n".join([urls[0], missing, urls[1]]))
    page.get_by_role("button", name="Create dataset").click()
    page.locator("#open-dataset").wait_for()
    rows = page.locator("#outcomes li")
    assert rows.count() == 3
    assert rows.nth(0).locator(".state").inner_text() == "saved"
    failed = rows.nth(1).locator(".state").inner_text()
    assert failed.startswith("failed: ") and "404" in failed, failed
    assert rows.nth(2).locator(".state").inner_text() == "saved"

    page.click("#open-dataset")
    page.locator("#grid figure").nth(1).wait_for()
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for i, colour in enumerate([(30, 180, 30), (200, 200, 40)]):
            bundle.writestr(f"more{i}.png", encode(Image.new("RGB", (64, 96), colour), "PNG"))
    page.set_input_files("#new-files", str(archive))
    page.get_by_role("button", name="Add images").click()
    page.locator("#grid figure").nth(3).wait_for()
    assert page.locator("#counts").inner_text() == "4 images, 0 captions"
    first = page.locator("#grid figure img").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())
    assert first.get_attribute("src").startswith("blob:")
    assert first.evaluate("img => Math.max(img.naturalWidth, img.naturalHeight)") <= 256

    page.fill("#caption-trigger_word", "zqx")
    page.locator("form", has=page.locator("#caption-trigger_word")).locator("summary").click()
    page.fill("#caption-max_new_tokens", "6")
    page.fill("#caption-num_beams", "1")
    page.get_by_role("button", name="Caption all").click()
    page.locator("#caption-status", has_text="4 of 4 images captioned").wait_for(timeout=120_000)
    captions = page.locator("#grid textarea")
    assert all(captions.nth(i).input_value().startswith("zqx, ") for i in range(4))
    assert page.locator("#counts").inner_text() == "4 images, 4 captions"
    page.locator("form", has=page.locator("#caption-trigger_word")).locator("summary").click()
    tab.shot("web-datasets.png")

    edited = page.locator("#grid textarea").nth(1)
    image = edited.get_attribute("data-image")
    edited.fill("zqx, a blue thing, by hand")
    edited.press("Tab")
    page.locator(f'figure[data-image="{image}"] .state.saved', has_text="saved").wait_for()
    detail = service.http.get("/datasets/pets").json()
    assert {i["file"]: i["caption"] for i in detail["images"]}[image] == "zqx, a blue thing, by hand"

    page.locator(f'figure[data-image="{image}"] button', has_text="Delete").click()
    page.locator(f'figure[data-image="{image}"]').wait_for(state="detached")
    assert image not in [i["file"] for i in service.http.get("/datasets/pets").json()["images"]]

    page.fill("#config-resolution", "512")
    page.get_by_role("button", name="Write config").click()
    page.locator("#config-result", has_text="Written").wait_for()
    assert "resolution = 512" in (service.settings.datasets_dir / "pets.toml").read_text()
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.set_viewport_size(WIDE)
    assert tab.take_errors() == []


def test_a_targets_control_images_are_shown_and_uploaded_from_its_card(
    tab: Tab, service: Service, tmp_path: Path
) -> None:
    page = tab.page
    page.goto(service.url + "/#/datasets/pets")
    target = page.locator("#grid figure").first.get_attribute("data-image")
    stem = Path(target).stem
    strip = page.locator(f'[data-controls-of="{target}"]')
    strip.filter(has_text="no controls").wait_for()
    files = []
    for i, colour in enumerate([(250, 250, 250), (10, 10, 10), (128, 0, 128)]):
        files.append(tmp_path / f"edit{i}.png")
        Image.new("RGB", (96, 80), colour).save(files[-1])

    strip.locator("input[type=file]").set_input_files(str(files[0]))
    strip.locator(".state.saved", has_text="1 added").wait_for()
    assert strip.locator("img[data-control]").count() == 1
    detail = {i["file"]: i["controls"] for i in service.http.get("/datasets/pets").json()["images"]}
    assert detail[target] == [f"{stem}.jpg"]
    assert not any(detail[other] for other in detail if other != target)

    strip.locator("input[type=file]").set_input_files([str(files[1]), str(files[2])])
    strip.locator(".state.saved", has_text="2 added").wait_for()
    expected = [f"{stem}.jpg", f"{stem}_1.jpg", f"{stem}_2.jpg"]
    detail = {i["file"]: i["controls"] for i in service.http.get("/datasets/pets").json()["images"]}
    assert detail[target] == expected
    saved = (service.settings.datasets_dir / "pets" / "control").glob("*.jpg")
    assert sorted(path.name for path in saved) == expected

    page.reload()
    shown = page.locator(f'[data-controls-of="{target}"] img[data-control]')
    shown.nth(2).wait_for()
    assert [shown.nth(i).get_attribute("data-control") for i in range(3)] == expected
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=shown.first.element_handle())
    assert shown.first.get_attribute("src").startswith("blob:")
    assert page.locator(f'[data-controls-of="{target}"]', has_text="controls: 3").is_visible()
    tab.shot("web-controls.png")
    assert tab.take_errors() == []


def test_unreadable_files_put_in_by_hand_are_named_on_their_cards(tab: Tab, service: Service) -> None:
    """A caption in another encoding and a broken image: the grid shows, each card says what is wrong."""
    folder = service.settings.datasets_dir / "handmade"
    folder.mkdir()
    Image.new("RGB", (64, 48), (20, 120, 200)).save(folder / "good.jpg")
    (folder / "good.txt").write_bytes("zqx, caf\u00e9".encode("cp1252"))
    (folder / "broken.jpg").write_bytes((folder / "good.jpg").read_bytes()[:200])
    page = tab.page
    page.goto(service.url + "/#/datasets/handmade")
    good = page.locator('figure[data-image="good.jpg"]')
    state = good.locator(".state", has_text="caption good.txt is not UTF-8 text")
    state.wait_for()
    assert state.inner_text().endswith("; saving replaces it")
    page.locator('figure[data-image="broken.jpg"] .noimg', has_text="no preview").wait_for()
    assert _status_of_resource(tab.take_errors(), 422)
    text = good.locator("textarea")
    text.fill("zqx, by hand")
    text.press("Tab")
    good.locator(".state.saved", has_text="saved").wait_for()
    assert (folder / "good.txt").read_text(encoding="utf-8") == "zqx, by hand"
    assert tab.take_errors() == []


def _events(service: Service, run_id: str) -> list[dict]:
    path = service.settings.runs_dir / run_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _fill_run(page: object, steps: int, *, samples: bool) -> None:
    page.goto(f"{page.url.split('#')[0]}#/runs")
    page.locator("h1", has_text="Runs").wait_for()
    page.goto(f"{page.url.split('#')[0]}#/train?dataset={TRAIN_DATASET}")
    page.locator("#train-output_name").wait_for()
    page.uncheck("#write-config")
    page.locator("#train-form section.card details summary").click()
    page.fill("#train-max_train_steps", str(steps))
    page.fill("#train-learning_rate", "0.001")
    page.uncheck("#train-gradient_checkpointing")
    page.select_option("#train-mixed_precision", "no")
    if samples:
        page.fill("#train-sample_prompts", "a red square\na green square")
        page.fill("#train-sample_every_n_steps", "8")
        page.fill("#train-sample_steps", "2")


def test_the_form_comes_from_the_schema_and_shows_errors_beside_fields(tab: Tab, service: Service) -> None:
    page = tab.page
    _fill_run(page, 20, samples=False)
    schema = service.http.get("/openapi.json").json()["components"]["schemas"]["TrainRequest"]
    assert page.locator("#train-network_dim").input_value() == str(
        schema["properties"]["network_dim"]["default"]
    )
    assert page.locator("#train-learning_rate").get_attribute("min") == "0"
    split = page.locator("#train-validation_split")  # a fraction or a count: no upper bound of 1
    assert split.get_attribute("min") == "0" and split.get_attribute("max") is None
    models = page.locator("#model-files option").evaluate_all("options => options.map(o => o.value)")
    assert {"flux1-dev.sft", "ae.sft", "clip_l.safetensors", "t5xxl_fp16.safetensors"} <= set(models)
    for field in ("pretrained_model", "ae", "clip_l", "t5xxl", "text_encoder"):
        assert page.locator(f"#train-{field}").get_attribute("list") == "model-files", field
    page.click("button[data-preset='48+ GB']")
    assert page.locator("#train-optimizer").input_value() == "adamw"
    assert page.locator("#dsconfig-batch_size").input_value() == "2"
    assert not page.locator("#train-gradient_checkpointing").is_checked()
    page.fill("#train-learning_rate", "0")
    page.fill("#train-network_dim", "5000")
    page.get_by_role("button", name="Start training").click()
    page.locator("#train-learning_rate-error", has_text="greater than 0").wait_for()
    page.evaluate("window.scrollTo(0, 0)")
    tab.shot("web-train.png")
    assert "less than or equal to 1024" in page.locator("#train-network_dim-error").inner_text()
    assert page.locator("#train-learning_rate").get_attribute("aria-invalid") == "true"
    assert "#/train" in page.url
    assert _status_of_resource(tab.take_errors(), 422)


def test_run_from_the_form_watched_reloaded_and_downloaded(
    tab: Tab, service: Service, tmp_path: Path
) -> None:
    page = tab.page
    _fill_run(page, 16, samples=True)
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"#/runs/"))
    run_id = page.url.rsplit("/", 1)[-1]
    chart = page.locator("#loss-chart")
    page.wait_for_function("() => Number(document.querySelector('#loss-chart').dataset.points || 0) >= 2")
    assert float(page.locator("#run-progress").get_attribute("value") or 0) > 0
    page.wait_for_function("() => document.querySelector('#run-progress').value >= 3")
    assert re.fullmatch(r"step \d+ / 16", page.locator("#step-text").inner_text())
    assert page.locator("#run-status").inner_text() == "running"

    before = int(chart.get_attribute("data-points"))
    page.reload()
    page.wait_for_function(
        f"() => Number(document.querySelector('#loss-chart').dataset.points || 0) >= {before}"
    )
    steps_on_disk = [e["step"] for e in _events(service, run_id) if e["event"] == "step"]
    assert int(chart.get_attribute("data-points")) >= min(len(steps_on_disk), before)
    page.locator("#samples img").first.wait_for()

    page.locator("#run-status", has_text="succeeded").wait_for(timeout=240_000)
    assert chart.get_attribute("data-points") == "16"
    assert page.locator("#step-text").inner_text() == "step 16 / 16"
    assert page.locator("#logs").inner_text().strip()
    assert "Warning" not in page.locator("#logs").inner_text()
    grid = page.locator("#samples table")
    assert grid.locator("tbody tr").count() == 2
    assert grid.locator("thead th").count() >= 3
    page.wait_for_function(
        "() => [...document.querySelectorAll('#samples img')].every(i => i.naturalWidth > 0)"
    )

    lora = service.settings.runs_dir / run_id / "output" / f"{TRAIN_DATASET}.safetensors"
    row = page.locator(f'#files li[data-file="{lora.name}"]')
    row.wait_for()
    tab.shot("web-run.png", full_page=True)
    with page.expect_download() as info:
        row.locator("button", has_text="Download").click()
    saved = tmp_path / "lora.safetensors"
    info.value.save_as(saved)
    assert saved.read_bytes() == lora.read_bytes()
    assert row.get_attribute("data-size") == str(lora.stat().st_size)
    assert re.search(r"\d+(\.\d)? (B|KiB|MiB)", row.locator(".size").inner_text())

    page.reload()
    page.locator("#run-status", has_text="succeeded").wait_for()
    page.wait_for_function("() => document.querySelector('#loss-chart').dataset.points === '16'")
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.set_viewport_size(WIDE)
    assert tab.take_errors() == []


def test_a_lost_connection_resumes_and_a_run_is_canceled_from_its_page(tab: Tab, service: Service) -> None:
    page = tab.page
    _fill_run(page, 400, samples=False)
    page.fill("#train-output_name", "to-cancel")
    page.fill("#train-dataset", TRAIN_DATASET)
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"#/runs/"))
    run_id = page.url.rsplit("/", 1)[-1]
    page.wait_for_function("() => document.querySelector('#run-progress').value >= 1", timeout=120_000)

    def streams() -> list[str]:
        return [url for url in tab.requests if url.endswith(f"/runs/{run_id}/events")]

    assert len(streams()) == 1
    seen = int(page.locator("#loss-chart").get_attribute("data-points"))
    service.restart()
    page.wait_for_function(f"() => Number(document.querySelector('#loss-chart').dataset.points) > {seen + 1}")
    assert len(streams()) >= 2 and tab.resumed_from and int(tab.resumed_from[0]) >= seen
    points, step = page.evaluate(
        "[Number(document.querySelector('#loss-chart').dataset.points), "
        "document.querySelector('#run-progress').value]"
    )
    assert points == step
    lost = tab.take_errors()
    assert lost and all(error.startswith("Failed to load resource: net::ERR_") for error in lost), lost
    page.click("#cancel")
    page.locator("#run-status", has_text="canceled").wait_for(timeout=60_000)
    deadline = time.monotonic() + 60
    while (
        service.http.get(f"/status/{run_id}").json()["status"] != "canceled" and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert service.http.get(f"/status/{run_id}").json()["status"] == "canceled"
    page.goto(page.url.split("#")[0] + "#/runs")
    page.locator("table.list a", has_text=run_id).wait_for()
    assert tab.take_errors() == []
    assert not [url for url in tab.requests if API_KEY in url]
