"""Edit-pair datasets over HTTP: control images through download and upload, listed with their targets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.datasets.pairs import pair_controls
from fluxtrain.settings import Settings
from tests.datasets import support


@pytest.fixture
def open_client(open_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(open_settings)) as test_client:
        yield test_client


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    return support.encode(Image.new("RGB", size, color), "PNG")


def test_controls_download_under_their_stems_and_list_with_their_targets(
    open_client: TestClient, open_settings: Settings, server: support.LoopbackServer
) -> None:
    target = server.add("/t/cat.png", support.Reply(body=png((200, 0, 0))))
    first = server.add("/c/x.png", support.Reply(body=png((0, 200, 0))))
    second = server.add("/c/y.png", support.Reply(body=png((0, 0, 200))))
    assert (
        open_client.post("/download-images", json={"urls": [target], "output_name": "pairs"}).status_code
        == 200
    )

    answer = open_client.post(
        "/download-images",
        json={
            "urls": [second, first],
            "output_name": "pairs",
            "role": "control",
            "control_for": ["cat_1", "cat_0"],
        },
    )

    folder = open_settings.datasets_dir / "pairs"
    assert answer.status_code == 200, answer.text
    assert answer.json()["files"] == {
        second: str(folder / "control/cat_1.jpg"),
        first: str(folder / "control/cat_0.jpg"),
    }
    loose = open_client.post(
        "/datasets/pairs/images", files=[("files", ("dog.png", png((9, 9, 9))))], data={"role": "control"}
    )
    assert loose.json()["files"] == {"dog.png": str(folder / "control/dog.jpg")}
    detail = open_client.get("/datasets/pairs").json()
    assert [(image["file"], image["controls"]) for image in detail["images"]] == [
        ("cat.jpg", ["cat_0.jpg", "cat_1.jpg"])
    ]
    assert detail["unpaired_controls"] == ["dog.jpg"]
    assert open_client.get("/datasets").json()["datasets"] == [{"name": "pairs", "images": 1, "captions": 0}]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"role": "control"}, "control_for"),
        ({"role": "control", "control_for": ["a", "b"]}, "control_for"),
        ({"role": "control", "control_for": ["../up"]}, "safe stem"),
        ({"control_for": ["cat"]}, "only for role 'control'"),
        ({"role": "mask"}, "role"),
    ],
)
def test_bad_control_requests_are_422(open_client: TestClient, extra: dict, message: str) -> None:
    answer = open_client.post(
        "/download-images", json={"urls": ["http://example.com/a.png"], "output_name": "pairs", **extra}
    )
    assert answer.status_code == 422
    assert message in answer.text


def test_a_bare_stem_and_numbered_stems_pair_in_order_and_a_target_keeps_its_own_name(tmp_path) -> None:
    names = ["cat_1.png", "cat.jpg", "cat_0.jpg", "cat_0_0.jpg", "bird_x.jpg"]
    pairing = pair_controls(["cat", "cat_0"], [tmp_path / name for name in names])
    assert {stem: [p.name for p in paths] for stem, paths in pairing.controls.items()} == {
        "cat": ["cat.jpg", "cat_1.png"],
        "cat_0": ["cat_0.jpg", "cat_0_0.jpg"],
    }
    assert [p.name for p in pairing.unpaired] == ["bird_x.jpg"]


def test_lint_endpoint_lists_pair_findings(open_client: TestClient, open_settings: Settings) -> None:
    folder = open_settings.datasets_dir / "pairs"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(png((1, 2, 3)))
    (folder / "dog.jpg").write_bytes(png((3, 2, 1)))
    (folder / "control").mkdir()
    (folder / "control" / "cat.jpg").write_bytes(png((9, 9, 9)))
    created = open_client.post("/create-dataset-config", json={"output_name": "pairs", "trigger_word": "zqx"})
    assert created.status_code == 200, created.text

    report = open_client.post("/datasets/pairs/lint").json()

    [missing] = [f for f in report["findings"] if f["kind"] == "control_missing"]
    assert missing["severity"] == "error" and missing["files"] == ["dog.jpg"]
