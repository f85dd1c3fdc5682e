"""Image work in worker processes: the same bytes as in this process, and a crash fails one URL only."""

import asyncio
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.datasets import ingest
from fluxtrain.datasets.image_worker import NICENESS
from fluxtrain.datasets.image_workers import ImageWorkers, image_workers
from fluxtrain.datasets.images import normalize_image
from fluxtrain.datasets.ingest import DownloadResult, download_images
from fluxtrain.settings import Settings
from tests.datasets import support
from tests.datasets.support import LoopbackServer, Reply


def run(settings: Settings, urls: list[str]) -> DownloadResult:
    return asyncio.run(download_images(settings=settings, name="set", urls=urls))


def _reencoded_inputs() -> dict[str, bytes]:
    gradient = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    rotated = Image.new("RGB", (40, 30), (10, 120, 240))
    exif = rotated.getexif()
    exif[0x0112] = 6
    return {
        "/gradient.png": support.encode(gradient, "PNG"),
        "/alpha.png": support.encode(Image.new("RGBA", (32, 32), (0, 200, 0, 90)), "PNG"),
        "/rotated.jpg": support.encode(rotated, "JPEG", exif=exif.tobytes()),
        "/cmyk.jpg": support.encode(Image.new("CMYK", (24, 24), (0, 80, 160, 20)), "JPEG"),
    }


def test_worker_processes_write_the_bytes_this_process_would(
    server: LoopbackServer, open_settings: Settings
) -> None:
    inputs = _reencoded_inputs()
    urls = {path: server.add(path, Reply(body=body)) for path, body in inputs.items()}
    result = run(open_settings.model_copy(update={"image_workers": 2}), list(urls.values()))
    assert result.failed == {}
    for path, url in urls.items():
        expected = normalize_image(inputs[path], max_pixels=open_settings.max_image_pixels)
        assert expected.stored == "reencoded"
        assert Path(result.files[url]).read_bytes() == expected.jpeg


def test_a_worker_that_dies_fails_that_url_only_and_the_pool_recovers(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "prepare_into", support.prepare_or_die)
    settings = open_settings.model_copy(update={"image_workers": 2})
    hostile = server.add("/hostile.png", Reply(body=png_bytes + support.CRASH_MARKER))
    fine = [server.add(f"/{index}.png", Reply(body=png_bytes)) for index in range(8)]
    result = run(settings, [*fine[:4], hostile, *fine[4:]])
    assert result.failed == {hostile: "refused: decoding the image crashed its worker process"}
    assert sorted(result.files) == sorted(fine)
    later = server.add("/later.png", Reply(body=png_bytes))
    assert list(run(settings, [later]).files) == [later]


def test_workers_import_no_model_libraries_and_the_parents_main_is_not_rerun() -> None:
    modules = asyncio.run(image_workers(2).run(support.loaded_modules))
    assert "PIL.Image" in modules and "fluxtrain.datasets.images" in modules
    for heavy in ("torch", "transformers", "diffusers", "fluxtrain.cli", "fluxtrain.api", "__mp_main__"):
        assert heavy not in modules


def test_workers_yield_the_cpu_to_the_event_loop() -> None:
    assert asyncio.run(image_workers(2).run(support.niceness)) == min(19, os.nice(0) + NICENESS)


def test_workers_do_not_inherit_the_services_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXTRAIN_API_KEY", "sekrit")
    monkeypatch.setenv("fluxtrain_database_url", "postgresql://u:pw@db/x")
    monkeypatch.setenv("FLUXTRAIN_IMAGE_WORKERS", "1")
    pool = ImageWorkers(1)
    try:
        names = asyncio.run(pool.run(support.environment_names))
    finally:
        pool.close()
    assert "FLUXTRAIN_IMAGE_WORKERS" in names
    assert not {"FLUXTRAIN_API_KEY", "fluxtrain_database_url"} & set(names)


def test_answers_reach_their_own_jobs_with_two_jobs_queued_in_each_worker() -> None:
    pool = image_workers(2)

    async def batch() -> list[tuple[object, int]]:
        return await asyncio.gather(
            *(pool.run(support.echo_after, index, 0.002 * (index % 3)) for index in range(40))
        )

    answers = asyncio.run(batch())
    assert [value for value, _ in answers] == list(range(40))
    assert len({pid for _, pid in answers}) == 2


def test_two_event_loops_in_two_threads_share_the_pool() -> None:
    pool = image_workers(2)
    results: dict[int, list[object]] = {}

    def loop_in_thread(offset: int) -> None:
        async def batch() -> list[object]:
            answers = await asyncio.gather(
                *(pool.run(support.echo_after, offset + i, 0.001) for i in range(30))
            )
            return [value for value, _ in answers]

        results[offset] = asyncio.run(batch())

    threads = [threading.Thread(target=loop_in_thread, args=(offset,)) for offset in (0, 1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {0: list(range(30)), 1000: list(range(1000, 1030))}


def test_cancelled_jobs_leave_the_pool_serving() -> None:
    pool = image_workers(2)

    async def cancel_some() -> list[object]:
        slow = [asyncio.ensure_future(pool.run(support.echo_after, index, 0.2)) for index in range(6)]
        await asyncio.sleep(0.05)
        for task in slow[:4]:
            task.cancel()
        finished = await asyncio.gather(*slow, return_exceptions=True)
        assert all(isinstance(outcome, asyncio.CancelledError) for outcome in finished[:4])
        assert [value for value, _ in finished[4:]] == [4, 5]  # type: ignore[misc]
        answers = await asyncio.gather(*(pool.run(support.echo_after, index, 0) for index in range(10)))
        return [value for value, _ in answers]

    assert asyncio.run(asyncio.wait_for(cancel_some(), 30)) == list(range(10))


def test_an_answer_that_cannot_be_read_back_fails_its_job_and_the_worker_serves_on() -> None:
    pool = image_workers(1)

    async def after_a_bad_answer() -> object:
        with pytest.raises(RuntimeError, match="a worker's answer could not be read: TypeError"):
            await pool.run(support.raise_unreadable)
        return await asyncio.wait_for(pool.run(support.echo_after, "next", 0), 10)

    value, _ = asyncio.run(after_a_bad_answer())  # type: ignore[misc]
    assert value == "next"
