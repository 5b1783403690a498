"""A miniature random SD + IP-Adapter in the standard layouts, built with this
package's own modules (no torch): a diffusers folder, a transformers image
encoder folder and an official-format adapter file. For the quickstart
notebook, smoke tests and first-image latency benchmarks on machines without
real weights. Its images are noise-like: the weights are random."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def byte_alphabet() -> list[str]:
    """CLIP's byte-level BPE alphabet: each of the 256 bytes as a unicode char, in vocabulary order."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return [chr(c) for c in bs] + [chr(256 + i) for i in range(256 - len(bs))]


def _byte_vocab() -> dict[str, int]:
    """The byte alphabet, its "</w>" forms and the two specials."""
    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return vocab


def make_tiny_pipeline(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``root/sd`` (unet, vae, text_encoder, tokenizer, scheduler),
    ``root/image_encoder`` and ``root/ip-adapter_tiny.safetensors``; return their paths."""
    from ipadapter_jax.adapters import IPAdapter
    from ipadapter_jax.convert.ip_adapter import save_ip_adapter
    from ipadapter_jax.models import AutoencoderKL, CLIPTextModel, CLIPVisionModelWithProjection, UNet2DConditionModel
    from ipadapter_jax.models.image_proj import ImageProjModel

    root = Path(root)
    sd = root / "sd"
    rngs = nnx.Rngs(seed)
    unet = UNet2DConditionModel(dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                                     norm_num_groups=8, cross_attention_dim=64, sample_size=8,
                                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), rngs=rngs)
    unet.save_pretrained(sd / "unet")
    AutoencoderKL(dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, layers_per_block=1),
                  rngs=rngs).save_pretrained(sd / "vae")
    vocab = _byte_vocab()
    tok = sd / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    CLIPTextModel(dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, eos_token_id=len(vocab) - 1), rngs=rngs).save_pretrained(
        sd / "text_encoder")
    (sd / "scheduler").mkdir(exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    CLIPVisionModelWithProjection(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=224, patch_size=56, projection_dim=32),
                                  rngs=rngs).save_pretrained(root / "image_encoder")
    adapter = IPAdapter.for_unet(unet, ImageProjModel(32, 64, 4, rngs=rngs), variant="base", rngs=rngs)
    save_ip_adapter(adapter, root / "ip-adapter_tiny.safetensors")
    return {"sd": sd, "image_encoder": root / "image_encoder", "adapter": root / "ip-adapter_tiny.safetensors"}
