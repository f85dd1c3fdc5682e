"""What a careless or hostile user types: a clear line and the right exit status, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from fluxtrain.cli import runs as runs_cli
from fluxtrain.cli.main import app
from fluxtrain.settings import Settings, get_settings
from tests.datasets.support import LoopbackServer, Reply

runner = CliRunner()


@pytest.fixture(autouse=True)
def data_root_from_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MOUNT_PATH", str(settings.data_root))
    monkeypatch.delenv("FLUXTRAIN_API_KEY", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _invoke(args: list[str], **env: str) -> tuple[int, str]:
    get_settings.cache_clear()
    result = runner.invoke(app, args, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PORT", "abc", "invalid PORT: Input should be a valid integer"),
        (
            "FLUXTRAIN_DOWNLOAD_CONCURRENCY",
            "0",
            "invalid FLUXTRAIN_DOWNLOAD_CONCURRENCY: Input should be greater",
        ),
        (
            "FLUXTRAIN_ALLOW_NETWORKS",
            "garbage",
            "invalid FLUXTRAIN_ALLOW_NETWORKS: 'garbage' does not appear",
        ),
        ("FLUXTRAIN_API_KEY", "s\u00e9cret", "invalid FLUXTRAIN_API_KEY: may only hold printable ASCII"),
        ("FLUXTRAIN_API_KEY", "a\nb", "invalid FLUXTRAIN_API_KEY: may only hold printable ASCII"),
    ],
)
def test_a_setting_that_does_not_validate_is_named_by_its_variable(
    variable: str, value: str, message: str
) -> None:
    code, output = _invoke(["datasets"], **{variable: value})
    assert code == 2 and message in output, output
    assert "Traceback" not in output and "s\u00e9cret" not in output


def test_a_mount_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for command in (["datasets"], ["download", "ds", "http://127.0.0.1:9/a.png"], ["lint", "ds"]):
        code, output = _invoke(command, MOUNT_PATH=str(afile))
        assert code == 2 and f"invalid MOUNT_PATH: {afile} is not a directory" in output, output


def test_an_api_key_with_a_line_ending_is_sent_without_it(settings: Settings) -> None:
    get_settings.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLUXTRAIN_API_KEY", "k3y\r\n")
        assert get_settings().api_key.get_secret_value() == "k3y"


def test_a_url_file_that_is_not_utf8_is_bad_input(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"http://127.0.0.1:9/a.png\n\xe9\xe8\n")
    code, output = _invoke(["download", "ds", "--file", str(urls)])
    assert code == 2 and f"invalid --file: {urls} is not UTF-8 text (byte 0xe9 at offset 25)" in output


def test_text_in_square_brackets_is_shown_as_it_was_typed(settings: Settings) -> None:
    url = "http://127.0.0.1:9/[/x]a[red]b.png"
    code, output = _invoke(["download", "ds", url])
    assert code == 1, output
    assert "[/x]a[red]b.png" in output and "refused address 127.0.0.1" in output


@pytest.fixture
def json_less(server: LoopbackServer) -> str:
    """A server that is not fluxtrain: a PNG at every run path, a redirect at /runs."""
    server.add("/status/abc", Reply(body=b"\x89PNG\r\n\x1a\nnot json", headers={"Content-Type": "image/png"}))
    server.add("/runs", Reply(status=301, headers={"Location": "/elsewhere"}))
    return server.url("")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["status", "abc"], 1, "did not answer with fluxtrain's JSON (HTTP 200, image/png)"),
        (["runs"], 1, "did not answer with fluxtrain's JSON (HTTP 301"),
        (["runs", "--status", "bogus"], 2, "'bogus' is not one of queued, running,"),
        (["train", "demo", "--idempotency-key", "\u00e9"], 2, "printable ASCII only"),
    ],
)
def test_answers_that_are_not_the_services_and_bad_options(
    json_less: str, args: list[str], code: int, message: str
) -> None:
    got, output = _invoke([*args, "--url", json_less.rstrip("/")])
    assert got == code and message in output, output


@pytest.mark.parametrize("url", ["garbage", "ftp://127.0.0.1:9", "http://127.0.0.1:99999"])
def test_a_url_that_is_no_service_address_is_bad_input(url: str) -> None:
    code, output = _invoke(["runs", "--url", url])
    assert code == 2 and "invalid --url" in output and "is `fluxtrain serve` running" not in output


def test_a_run_id_is_one_path_segment(server: LoopbackServer) -> None:
    server.add("/health", Reply(body=json.dumps({"status": "ok"}).encode()))
    code, output = _invoke(["status", "../health", "--url", server.url("").rstrip("/")])
    assert code == 1 and "404" in output, output
    assert server.hits == ["/status/..%2Fhealth"]


def test_following_a_run_whose_service_went_away_ends_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status = {"run_id": "r1", "status": "running", "progress": {"total_steps": 10}}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/status/r1":
            return httpx.Response(200, json=status)
        raise httpx.ConnectError("Connection refused", request=request)

    monkeypatch.setattr(runs_cli.time, "sleep", lambda _seconds: None)
    client = httpx.Client(base_url="http://127.0.0.1:9", transport=httpx.MockTransport(answer))
    with pytest.raises(typer.Exit) as ended:
        runs_cli.follow(client, "r1")
    assert ended.value.exit_code == 1
    shown = " ".join(capsys.readouterr().err.split())
    assert "lost the service at http://127.0.0.1:9: Connection refused" in shown
    assert "the run may still be going (fluxtrain status r1)" in shown


def test_serve_takes_only_real_ports_and_a_failed_bind_exits_1(server: LoopbackServer) -> None:
    for port in ("0", "70000"):
        code, output = _invoke(["serve", "--port", port])
        assert code == 2 and "Invalid value for '--port'" in output, output
    code, output = _invoke(["serve", "--port", str(server.port)])
    assert code == 1, output


@pytest.mark.parametrize("command", ["config", "caption"])
def test_help_says_a_required_option_is_required(command: str) -> None:
    code, output = _invoke([command, "--help"])
    assert code == 0 and "PydanticUndefined" not in output and "[required]" in output
