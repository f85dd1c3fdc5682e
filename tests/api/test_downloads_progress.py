"""`GET /datasets/{name}/downloads`: the counts of a running download, idle otherwise, 404 unknown."""

import threading

from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings
from tests.datasets import support
from tests.datasets.support import LoopbackServer, Reply


def test_a_running_download_shows_its_counts_then_the_answer_is_idle(
    open_settings: Settings, server: LoopbackServer
) -> None:
    png_bytes = support.encode(Image.new("RGB", (32, 24), (20, 90, 200)), "PNG")
    gate = threading.Event()
    ready = [server.add(f"/r{index}.png", Reply(body=png_bytes)) for index in range(3)]
    held = server.add("/held.png", Reply(body=png_bytes, gate=gate))
    gone = server.url("/gone.png")
    answer: dict[str, object] = {}
    with TestClient(create_app(open_settings)) as client:
        assert client.get("/datasets/never/downloads").status_code == 404

        def download() -> None:
            answer["response"] = client.post(
                "/download-images", json={"urls": [*ready, gone, held, ready[0]], "output_name": "live"}
            )

        worker = threading.Thread(target=download)
        worker.start()
        try:
            for _ in range(200):
                body = client.get("/datasets/live/downloads").json()
                if body.get("running") and body["downloads"][0]["done"] == 4:
                    break
                threading.Event().wait(0.02)
            assert body["name"] == "live" and body["running"] is True
            (running,) = body["downloads"]
            assert (running["total"], running["done"], running["saved"], running["failed"]) == (5, 4, 3, 1)
            assert running["images_per_s"] > 0 and running["started_at"]
        finally:
            gate.set()
            worker.join()
        response = answer["response"]
        assert response.status_code == 200  # type: ignore[attr-defined]
        assert set(response.json()) == {"message", "files", "failed"}  # type: ignore[attr-defined]
        idle = client.get("/datasets/live/downloads")
        assert idle.status_code == 200
        assert idle.json() == {"name": "live", "running": False, "downloads": []}
