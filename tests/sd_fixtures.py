"""A tiny random Stable Diffusion pipeline folder made with diffusers /
transformers (UNet, VAE, CLIP text + a tiny BPE tokenizer, CLIP vision,
scheduler config) plus an official-format IP-Adapter file, saved the way real
folders look."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import ipadapter_fixtures as fx

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
HEIGHT = WIDTH = 16     # pixels; latents 8x8 with a 2-level VAE


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP BPE vocabulary with a couple of merges; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in ("th", "the</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77,
                                                              "tokenizer_class": "CLIPTokenizer"}))
    return len(vocab)


def build_pipeline_folder(root: Path, seed: int = 0, *, with_image: bool = False) -> dict:
    """Write root/sd (diffusers layout), root/image_encoder, root/ip-adapter.safetensors
    (and, ``with_image``, root/ref.png as ``paths["image"]``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    sd = root / "sd"
    c = fx.UNET["cross_attention_dim"]
    unet = UNet2DConditionModel(**fx.UNET)
    unet.save_pretrained(sd / "unet")
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=HEIGHT).save_pretrained(sd / "vae")
    vocab_size = write_tokenizer(sd / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=c, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                                 eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)).save_pretrained(
        sd / "text_encoder")
    (sd / "scheduler").mkdir(parents=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}))
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=fx.CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=112, projection_dim=fx.CLIP_DIM)).save_pretrained(root / "image_encoder")
    adapter = root / "ip-adapter_sd15.safetensors"
    save_file(fx.flat(fx.image_proj("base", c, seed=seed), fx.ip_layers(unet, seed=seed + 1)), adapter)
    plus = root / "ip-adapter-plus_sd15.safetensors"
    save_file(fx.flat(fx.image_proj("plus", c, seed=seed + 2), fx.ip_layers(unet, seed=seed + 3)), plus)
    paths = {"sd": sd, "image_encoder": root / "image_encoder", "adapter": adapter, "plus": plus}
    if with_image:
        paths["image"] = reference_image(root / "ref.png")
    return paths


def reference_image(path: Path, seed: int = 0, size=(40, 30)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path
