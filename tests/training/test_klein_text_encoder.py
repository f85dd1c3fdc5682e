"""klein's Qwen3 text encoder loads from a single file (bf16 or fp8) and from a Hugging Face shard
folder, and gives the same features from each (fp8 to its precision)."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from fluxtrain.training.families.klein import (
    KleinTextEncoder,
    load_qwen3,
    load_qwen3_tokenizer,
    qwen3_config_from_shapes,
)

CAPTION = "a photo of a dog sitting on the grass"


def _features(path: Path, models: Path) -> torch.Tensor:
    model = load_qwen3(path, dtype=torch.float32, device="cpu")
    tokenizer = load_qwen3_tokenizer(models / "tokenizers" / "qwen3")
    return KleinTextEncoder(model, tokenizer, "flux2-klein-4b").encode([CAPTION])["hidden"].float()


def test_qwen3_from_a_file_an_fp8_file_and_a_shard_folder_gives_the_same_features(
    tiny_flux2_models: Path, tmp_path: Path
) -> None:
    single_file = tiny_flux2_models / "qwen_3_4b.safetensors"
    single = _features(single_file, tiny_flux2_models)
    sd = load_file(single_file)
    config: Qwen3Config = qwen3_config_from_shapes({k.removeprefix("model."): v for k, v in sd.items()})
    causal = Qwen3ForCausalLM(config)
    missing, unexpected = causal.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    shards = tmp_path / "Qwen3-4B"
    causal.save_pretrained(shards, max_shard_size="200KB")
    assert len(list(shards.glob("model-*-of-*.safetensors"))) > 1
    torch.testing.assert_close(_features(shards, tiny_flux2_models), single, rtol=1e-2, atol=1e-2)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "qwen_3_4b_fp8.safetensors"))
    quantised = _features(tmp_path / "qwen_3_4b_fp8.safetensors", tiny_flux2_models)
    assert quantised.shape == single.shape and not torch.equal(quantised, single)
    torch.testing.assert_close(quantised, single, rtol=0.25, atol=0.25)
