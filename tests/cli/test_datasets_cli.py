from typer.testing import CliRunner

from fluxtrain.cli import options as cli_options
from fluxtrain.cli.main import app
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply


def test_download_reports_failures_and_exits_1(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(cli_options, "get_settings", lambda: open_settings)
    good = server.add("/good.png", Reply(body=png_bytes))
    url_file = tmp_path / "urls.txt"
    url_file.write_text(f"# comment\n{server.url('/gone.png')}\n\n")
    result = CliRunner().invoke(app, ["download", "cli-set", good, "--file", str(url_file)])
    assert result.exit_code == 1, result.output
    assert "saved 1 of 2" in result.output
    assert "HTTP 404 Not Found" in result.output
    assert (open_settings.datasets_dir / "cli-set" / "good.jpg").is_file()

    again = CliRunner().invoke(app, ["download", "cli-set", good])
    assert again.exit_code == 0, again.output

    listing = CliRunner().invoke(app, ["datasets"])
    assert listing.exit_code == 0
    assert "cli-set" in listing.output


def test_download_refuses_a_bad_name_and_no_urls(open_settings: Settings, monkeypatch) -> None:
    monkeypatch.setattr(cli_options, "get_settings", lambda: open_settings)
    bad = CliRunner().invoke(app, ["download", "../up", "http://example.com/a.png"])
    assert bad.exit_code == 2
    assert "invalid NAME" in bad.output
    empty = CliRunner().invoke(app, ["download", "ok"])
    assert empty.exit_code == 2
    assert "at least one URL" in empty.output


def test_download_shows_a_progress_bar_with_rate_and_failures(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(cli_options, "get_settings", lambda: open_settings)
    url_file = tmp_path / "urls.txt"
    urls = [server.add(f"/p{index}.png", Reply(body=png_bytes)) for index in range(5)]
    url_file.write_text("\n".join([*urls, server.url("/missing.png")]) + "\n")
    result = CliRunner().invoke(app, ["download", "progress-set", "--file", str(url_file)])
    assert result.exit_code == 1, result.output
    assert "6/6" in result.output
    assert "img/s" in result.output
    assert "1 failed" in result.output


def test_download_of_controls_stores_them_under_their_stems(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, monkeypatch
) -> None:
    monkeypatch.setattr(cli_options, "get_settings", lambda: open_settings)
    source = server.add("/x/source.png", Reply(body=png_bytes))
    command = ["download", "pairs", source, "--role", "control", "--control-for", "cat"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert (open_settings.datasets_dir / "pairs" / "control" / "cat.jpg").is_file()
    missing = CliRunner().invoke(app, ["download", "pairs", source, "--role", "control"])
    assert missing.exit_code == 2 and "control_for" in missing.output
    bad = CliRunner().invoke(app, ["download", "pairs", source, "--role", "mask"])
    assert bad.exit_code == 2 and "--role" in bad.output
