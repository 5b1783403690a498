"""Random official-format IP-Adapter state dicts and a small diffusers UNet
carrying them, for the parity tests.

The key names and shapes written here follow the official IP-Adapter files
(h94/IP-Adapter) independently of the package; diffusers' own loader
(``_load_ip_adapter_weights``) then checks the layout: a wrong name fails
there, not silently here.
"""

from __future__ import annotations

import numpy as np
import torch

UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
            cross_attention_dim=64, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
CLIP_DIM = 24          # image_embeds width of the (imaginary) image encoder
CLIP_HIDDEN = 40       # hidden size of its penultimate states
CLIP_TOKENS = 5        # patches + CLS at its resolution
ID_DIM = 16            # InsightFace embedding width (512 in real files)


class Rand:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def w(self, *shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def ln(self, prefix, dim):
        return {f"{prefix}.weight": 1 + self.w(dim, scale=0.1), f"{prefix}.bias": self.w(dim, scale=0.1)}

    def lin(self, prefix, n_in, n_out, bias=True):
        out = {f"{prefix}.weight": self.w(n_out, n_in)}
        if bias:
            out[f"{prefix}.bias"] = self.w(n_out, scale=0.1)
        return out


def perceiver(r: Rand, prefix: str, dim: int, depth: int, heads: int, dim_head: int = 64, mult: int = 4):
    sd = {}
    inner = heads * dim_head
    for i in range(depth):
        p = f"{prefix}layers.{i}"
        sd.update(r.ln(f"{p}.0.norm1", dim))
        sd.update(r.ln(f"{p}.0.norm2", dim))
        sd.update(r.lin(f"{p}.0.to_q", dim, inner, bias=False))
        sd.update(r.lin(f"{p}.0.to_kv", dim, 2 * inner, bias=False))
        sd.update(r.lin(f"{p}.0.to_out", inner, dim, bias=False))
        sd.update(r.ln(f"{p}.1.0", dim))
        sd.update(r.lin(f"{p}.1.1", dim, dim * mult, bias=False))
        sd.update(r.lin(f"{p}.1.3", dim * mult, dim, bias=False))
    return sd


def image_proj(variant: str, c: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``image_proj`` weights of an official file (keys without the prefix)."""
    r = Rand(seed)
    if variant == "base":
        return {**r.lin("proj", CLIP_DIM, 4 * c), **r.ln("norm", c)}
    if variant == "full-face":
        return {**r.lin("proj.0", CLIP_HIDDEN, CLIP_HIDDEN), **r.lin("proj.2", CLIP_HIDDEN, c), **r.ln("proj.3", c)}
    if variant == "plus":
        dim = 64  # heads = 1 at dim_head 64
        return {"latents": r.w(1, 6, dim, scale=dim ** -0.5), **r.lin("proj_in", CLIP_HIDDEN, dim),
                **r.lin("proj_out", dim, c), **r.ln("norm_out", c), **perceiver(r, "", dim, 4, heads=1)}
    if variant == "faceid":
        return {**r.lin("proj.0", ID_DIM, 2 * ID_DIM), **r.lin("proj.2", 2 * ID_DIM, 4 * c), **r.ln("norm", c)}
    if variant == "faceid-plus":
        # dim = cross_attention_dim; heads = dim // 64 in the official code, so c must be 64 here
        return {**r.lin("proj.0", ID_DIM, 2 * ID_DIM), **r.lin("proj.2", 2 * ID_DIM, 4 * c), **r.ln("norm", c),
                **r.lin("perceiver_resampler.proj_in", CLIP_HIDDEN, c),
                **r.lin("perceiver_resampler.proj_out", c, c), **r.ln("perceiver_resampler.norm_out", c),
                **perceiver(r, "perceiver_resampler.", c, 4, heads=c // 64)}
    raise ValueError(variant)


def ip_layers(torch_unet, seed: int = 1, lora_rank: int | None = None) -> dict[str, np.ndarray]:
    """``ip_adapter`` weights for every cross-attention processor of ``torch_unet``
    (and LoRA on every processor when ``lora_rank`` is given)."""
    r = Rand(seed)
    c = torch_unet.config.cross_attention_dim
    sd = {}
    for p, (name, _) in enumerate(torch_unet.attn_processors.items()):
        attn = torch_unet.get_submodule(name.rsplit(".processor", 1)[0])
        hidden = attn.to_q.out_features
        if name.endswith("attn2.processor"):
            sd[f"{p}.to_k_ip.weight"] = r.w(hidden, c)
            sd[f"{p}.to_v_ip.weight"] = r.w(hidden, c)
        if lora_rank:
            kv_in = attn.to_k.in_features
            for proj, n_in in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                sd[f"{p}.{proj}_lora.down.weight"] = r.w(lora_rank, n_in)
                sd[f"{p}.{proj}_lora.up.weight"] = r.w(hidden, lora_rank, scale=0.3 / np.sqrt(lora_rank))
    return sd


def flat(image_proj_sd, ip_sd) -> dict[str, np.ndarray]:
    return {**{f"image_proj.{k}": v for k, v in image_proj_sd.items()},
            **{f"ip_adapter.{k}": v for k, v in ip_sd.items()}}


def torch_nested(image_proj_sd, ip_sd) -> dict:
    t = lambda d: {k: torch.from_numpy(v.copy()) for k, v in d.items()}
    return {"image_proj": t(image_proj_sd), "ip_adapter": t(ip_sd)}


def merge_lora_into_torch_unet(torch_unet, ip_sd, strength: float = 1.0) -> None:
    """Reference for FaceID LoRA: add strength * up @ down to each attention's
    q/k/v/out weight (the same map as ``W x + s * up(down(x))``)."""
    with torch.no_grad():
        for p, (name, _) in enumerate(torch_unet.attn_processors.items()):
            attn = torch_unet.get_submodule(name.rsplit(".processor", 1)[0])
            for proj, module in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                                 ("to_out", attn.to_out[0])):
                delta = ip_sd[f"{p}.{proj}_lora.up.weight"] @ ip_sd[f"{p}.{proj}_lora.down.weight"]
                module.weight += strength * torch.from_numpy(delta)


# --------------------------------------------------------------------------- SDXL
# A small SDXL-style UNet: linear projections, per-block head counts and
# transformer depths (the up blocks take them reversed), and ``text_time``
# added conditioning. Its context is two text encoders' penultimate states
# side by side (widths SDXL_TEXT_WIDTHS, as CLIP-L 768 + bigG 1280 = 2048);
# the pooled embedding is encoder 2's projection (SDXL_POOLED wide) followed
# by 6 time ids of SDXL_TIME_DIM each (SDXL: 1280 + 6 x 256 = 2816).
SDXL_TEXT_WIDTHS = (32, 48)
SDXL_POOLED = 40
SDXL_TIME_DIM = 8
SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 attention_head_dim=(4, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
                 projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME_DIM, sample_size=8)


def sdxl_time_ids(batch: int, seed: int = 0) -> np.ndarray:
    """[B, 6] micro-conditioning ids as SDXL pipelines build them: original
    size (h, w), crop top-left (y, x), target size (h, w), in pixels."""
    rng = np.random.default_rng(seed)
    original = rng.integers(4, 17, (batch, 2)) * 64
    crop = rng.integers(0, 4, (batch, 2)) * 32
    target = np.tile([[1024, 1024]], (batch, 1))
    return np.concatenate([original, crop, target], axis=1).astype(np.float32)
