"""The real Dockerfile, built and run here without a Docker engine (`make test-container`).

buildah builds it over a debootstrapped Debian bookworm passed as BASE_IMAGE, with this
machine's CPU torch wheel mounted into the build instead of the CUDA build from PyPI; the base
and its rootfs are cached under FLUXTRAIN_TEST_CACHE (default /var/cache/fluxtrain-test). The
server then runs from the image in chroot isolation, which shares this host's network, on a
loopback port. Needs root, buildah and debootstrap; skipped unless FLUXTRAIN_TEST_CONTAINER=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fluxtrain.settings import Settings

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("FLUXTRAIN_TEST_CONTAINER") != "1", reason="slow: run by make test-container"
    ),
    pytest.mark.timeout(3600),
]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FLUXTRAIN_TEST_CACHE", "/var/cache/fluxtrain-test"))
BASE = "localhost/fluxtrain-test-base:bookworm"
IMAGE = "localhost/fluxtrain:container-test"
DEBIAN_MIRROR = os.environ.get("FLUXTRAIN_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def buildah(*args: str, timeout: float = 600) -> str:
    """One buildah command on the test's own storage (vfs: no kernel overlay needed)."""
    command = [
        "buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"),
        "--storage-driver", "vfs", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args[:2])} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def torch_wheel() -> Path:
    """This machine's CPU wheel of the torch version the Makefile pins, from pip's find-links."""
    version = re.search(r"^TORCH_PIN := torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert version, "Makefile has no TORCH_PIN"
    folders = [Path(part) for part in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()]
    for folder in folders:
        for wheel in sorted(folder.glob(f"torch-{version.group(1)}+cpu-cp311-*.whl")):
            return wheel
    pytest.fail(f"no torch {version.group(1)}+cpu cp311 wheel in {folders} (PIP_FIND_LINKS)")


def ensure_base() -> None:
    """Debootstrap bookworm once and import it as a local image; both stay cached for later runs."""
    if buildah("images", "--quiet", "--filter", f"reference={BASE}").strip():
        return
    rootfs = CACHE / "rootfs"
    if not rootfs.is_dir():
        partial = CACHE / "rootfs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(partial), DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=1800,
        )  # fmt: skip
        partial.rename(rootfs)
    archive = CACHE / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    container = buildah("from", "scratch").strip()
    buildah("add", container, str(archive), "/")
    buildah("commit", "--rm", container, BASE)
    archive.unlink()


@pytest.fixture(scope="module")
def image() -> Iterator[dict]:
    """The image's Docker config, built from the repository's Dockerfile; removed afterwards."""
    if os.geteuid() != 0 or not (shutil.which("buildah") and shutil.which("debootstrap")):
        pytest.fail("make test-container needs root, buildah and debootstrap (see .ci/run)")
    CACHE.mkdir(parents=True, exist_ok=True)
    ensure_base()
    wheel = torch_wheel()
    spec = "torch==" + wheel.name.split("-")[1]
    buildah(
        "bud", "--isolation", "chroot", "--format", "docker", "--pull=never",
        "--volume", f"{wheel.parent}:/wheels:ro", "--volume", f"{HOST_CA}:/run/host-ca.crt:ro",
        "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"TORCH_SPEC={spec}",
        "--build-arg", "TORCH_FIND_LINKS=/wheels", "--build-arg", "EXTRAS=cloud",
        "--build-arg", "PIP_CERT=/run/host-ca.crt", "--tag", IMAGE, str(REPO),
        timeout=2400,
    )  # fmt: skip
    try:
        yield json.loads(buildah("inspect", "--type", "image", IMAGE))["Docker"]["config"]
    finally:
        buildah("rmi", IMAGE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(image: dict) -> Iterator[tuple[str, str, int]]:
    """The image's own command running from a working container, on a loopback port of this host."""
    container = buildah("from", "--pull=never", IMAGE).strip()
    port = free_port()
    server = subprocess.Popen(
        ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"),
         "--storage-driver", "vfs", "run", "--isolation", "chroot",
         "--env", "FLUXTRAIN_HOST=127.0.0.1", "--env", f"PORT={port}", container, "--", *image["Cmd"]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the server exited:\n{server.stdout.read().decode()[-4000:]}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health within 180 s"
            time.sleep(1)
        yield container, base, port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        buildah("rm", container)


def test_image_config_agrees_with_the_settings(image: dict) -> None:
    defaults = Settings(_env_file=None)
    env = dict(item.split("=", 1) for item in image["Env"])
    assert image["User"] == "fluxtrain"
    assert image["Cmd"] == ["fluxtrain", "serve"]
    assert env["FLUXTRAIN_HOST"] == "0.0.0.0"
    assert set(image["ExposedPorts"]) == {f"{env['PORT']}/tcp"} == {f"{defaults.port}/tcp"}
    assert set(image["Volumes"]) == {env["MOUNT_PATH"], env["FS_PATH"]} == {"/data", "/models"}
    assert "/health" in " ".join(image["Healthcheck"]["Test"])


def test_the_served_image_answers_as_the_service(served: tuple[str, str, int]) -> None:
    _, base, port = served
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "api_key": "none"}
    docs = httpx.get(f"{base}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    private = f"{base}/health.png"
    body = {"urls": [private], "output_name": "probe"}
    refused = httpx.post(f"{base}/download-images", json=body, timeout=30)
    assert refused.status_code == 200
    assert refused.json()["failed"][private].startswith("refused address 127.0.0.1")


def test_the_server_runs_as_the_non_root_user(served: tuple[str, str, int], image: dict) -> None:
    container, _, port = served
    uid = int(buildah("run", "--isolation", "chroot", container, "--", "id", "-u").strip())
    assert uid != 0
    listening = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True)
    pids = {int(pid) for pid in re.findall(r"pid=(\d+)", listening.stdout)}
    assert pids, listening.stdout
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Uid:\s+(\d+)", status, re.M).group(1) == str(uid)


def test_the_healthcheck_passes_in_the_image(served: tuple[str, str, int], image: dict) -> None:
    container, _, port = served
    kind, *command = image["Healthcheck"]["Test"]
    assert kind == "CMD"
    buildah("run", "--isolation", "chroot", "--env", f"PORT={port}", container, "--", *command)
