from pathlib import Path

from typer.testing import CliRunner

from fluxtrain.cli.main import app


def test_tiny_models_writes_a_models_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dev", "tiny-models", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    root = tmp_path / "tiny"
    for name in ("flux1-dev.sft", "ae.sft", "clip_l.safetensors", "t5xxl_fp16.safetensors"):
        assert (root / name).stat().st_size > 0
    assert (root / "tokenizers" / "clip_l").is_dir()
    assert (root / "tokenizers" / "t5xxl").is_dir()
    assert (root / "florence2" / "config.json").is_file()
    for name in ("flux-2-klein-4b.safetensors", "flux2-vae.safetensors", "qwen_3_4b.safetensors"):
        assert (root / name).stat().st_size > 0
    assert (root / "tokenizers" / "qwen3" / "chat_template.jinja").is_file()
    assert f"FS_PATH={root.resolve()}" in result.output
