"""The full-size FLUX.1 transformer against diffusers, a piece at a time (both
whole transformers do not fit 24 GB twice in float32): one double-stream and
one single-stream block with random full-size weights (3072 wide, 24 heads of
128), the rotary tables of FLUX.1's axes (16, 56, 56) over a packed 512-px
image and a T5 prompt, and the timestep / guidance / pooled-text embedding and
the output head whole. Each part is built, compared and freed."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from helpers import rel_err

DIM, HEADS, HEAD_DIM = 3072, 24, 128
TEXT, SIDE = 64, 32          # 64 T5 tokens; a 32 x 32 grid of packed tokens (512 px)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, SIDE * SIDE, DIM)).astype(np.float32)
    ctx = rng.standard_normal((1, TEXT, DIM)).astype(np.float32)
    temb = rng.standard_normal((1, DIM)).astype(np.float32)
    return x, ctx, temb


def _rope():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from ipadapter_jax.models.flux import rope_tables
    from ipadapter_jax.pipeline.flux import latent_image_ids

    ids = np.concatenate([np.zeros((TEXT, 3), np.float32), latent_image_ids(2 * SIDE, 2 * SIDE)])
    ours = rope_tables(ids, (16, 56, 56))
    with torch.no_grad():
        ref = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.from_numpy(ids))
    return ours, ref


def _load(make, module) -> object:
    from ipadapter_jax.io.params import load_state_dict_into

    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    return load_state_dict_into(make, state, source="full-size block")[0]


def test_rope_tables_match_at_full_size():
    (cos, sin), (ref_cos, ref_sin) = _rope()
    assert cos.shape == (TEXT + SIDE * SIDE, HEAD_DIM)
    assert np.abs(cos - ref_cos.numpy()).max() <= 1e-6 and np.abs(sin - ref_sin.numpy()).max() <= 1e-6


@pytest.mark.parametrize("kind", ["double", "single"])
def test_full_size_block_matches_diffusers(kind):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock as TorchSingle
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock as TorchDouble
    from flax import nnx

    from ipadapter_jax.models.flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(1)
    x, ctx, temb = _inputs(2)
    (cos, sin), ref_rope = _rope()
    if kind == "double":
        ref = TorchDouble(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM).eval()
        with torch.no_grad():
            ref_ctx, ref_x = ref(torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(temb), ref_rope)
        expected = np.concatenate([ref_ctx.numpy(), ref_x.numpy()], axis=1)
        block = _load(lambda: FluxTransformerBlock(DIM, HEADS, HEAD_DIM, dtype=np.float32, backend="xla",
                                                   rngs=nnx.Rngs(0)), ref)
        del ref
        gc.collect()
        out_ctx, out_x = block(x, ctx, temb, (cos, sin))
        out = np.concatenate([np.asarray(out_ctx), np.asarray(out_x)], axis=1)
    else:
        ref = TorchSingle(dim=DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM).eval()
        with torch.no_grad():
            ref_ctx, ref_x = ref(torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(temb), ref_rope)
        expected = np.concatenate([ref_ctx.numpy(), ref_x.numpy()], axis=1)
        block = _load(lambda: FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM, dtype=np.float32, backend="xla",
                                                         rngs=nnx.Rngs(0)), ref)
        del ref
        gc.collect()
        out = np.asarray(block(np.concatenate([ctx, x], axis=1), temb, (cos, sin)))
    assert rel_err(out, expected) <= 1e-5


def test_full_size_embeddings_and_head_match_diffusers():
    """FLUX.1-dev's time_text_embed (timestep, guidance, pooled CLIP-L) and its AdaLN output head."""
    from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings
    from diffusers.models.normalization import AdaLayerNormContinuous
    from flax import nnx

    from ipadapter_jax.models.flux import AdaLayerNorm, TimeTextEmbedding, modulate

    torch.manual_seed(3)
    rng = np.random.default_rng(4)
    t = np.asarray([999.0, 250.5], np.float32)
    g = np.asarray([3500.0, 1000.0], np.float32)
    pooled = rng.standard_normal((2, 768)).astype(np.float32)
    ref = CombinedTimestepGuidanceTextProjEmbeddings(DIM, 768).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(t), torch.from_numpy(g), torch.from_numpy(pooled)).numpy()
    ours = _load(lambda: TimeTextEmbedding(DIM, 768, True, dtype=np.float32, rngs=nnx.Rngs(0)), ref)
    assert rel_err(ours(t, g, pooled), expected) <= 1e-5

    head = AdaLayerNormContinuous(DIM, DIM, elementwise_affine=False, eps=1e-6).eval()
    x = rng.standard_normal((2, 256, DIM)).astype(np.float32)
    with torch.no_grad():
        expected = head(torch.from_numpy(x), torch.from_numpy(expected)).numpy()
    norm = _load(lambda: AdaLayerNorm(DIM, 2, dtype=np.float32, rngs=nnx.Rngs(0)), head)
    scale, shift = norm.modulation(ours(t, g, pooled))
    assert rel_err(modulate(norm.norm(x), shift, scale), expected) <= 1e-5
