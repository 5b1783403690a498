"""Controls that diffusers lacks (ComfyUI weight types, combine modes,
start/end) against small independent NumPy computations of their documented
formulas; per-block dicts and masks at SD1.5's real layer layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from ipadapter_jax import ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from test_unet_sd15_full import SD15_UNET_CONFIG


@pytest.fixture(scope="module")
def sd15():
    """The SD1.5 UNet's structure (abstract: no weights are allocated)."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(SD15_UNET_CONFIG, rngs=nnx.Rngs(0)))


# ComfyUI's transformer index of SD1.5's 16 cross-attention layers in processor
# order: input blocks 0-5, then output blocks 7-15, then the middle block 6.
COMFY_T = np.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 6])
KIND = np.array(["input"] * 6 + ["output"] * 9 + ["middle"])


def test_comfy_order(sd15):
    assert ip_adapter.comfy_order(sd15) == COMFY_T.tolist()


@pytest.mark.parametrize("weight_type", ["linear", "ease in", "ease out", "ease in-out", "reverse in-out"])
def test_comfy_curves(sd15, weight_type):
    w, n, t = 0.8, 16, COMFY_T.astype(float)
    expected = {
        "linear": np.full(16, w),
        "ease in": w * (0.05 + 0.95 * (1 - t / n)),
        "ease out": w * (0.05 + 0.95 * t / n),
        "ease in-out": w * (0.05 + 0.95 * (1 - np.abs(t - n / 2) / (n / 2))),
        "reverse in-out": w * (0.05 + 0.95 * np.abs(t - n / 2) / (n / 2)),
    }[weight_type]
    np.testing.assert_allclose(ip_adapter.layer_scales(sd15, w, weight_type=weight_type), expected, rtol=1e-6)


@pytest.mark.parametrize("weight_type, weak", [("weak input", ["input"]), ("weak middle", ["middle"]),
                                               ("weak output", ["output"]), ("strong middle", ["input", "output"])])
def test_comfy_weak_strong(sd15, weight_type, weak):
    expected = np.where(np.isin(KIND, weak), 0.2 * 1.5, 1.5)
    np.testing.assert_allclose(ip_adapter.layer_scales(sd15, 1.5, weight_type=weight_type), expected, rtol=1e-6)


@pytest.mark.parametrize("weight_type, by_t", [
    ("style transfer", {t: 1.0 for t in [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]}),
    ("composition", {4: 0.25, 5: 1.0}),
    ("strong style transfer", {t: 1.0 for t in [0, 1, 2, 3] + list(range(6, 16))}),
    ("style and composition", {**{t: 1.0 for t in [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]}, 4: 0.5 * 0.25, 5: 0.5}),
    ("strong style and composition", {**{t: 1.0 for t in [0, 1, 2, 3] + list(range(6, 16))}, 4: 0.5, 5: 0.5}),
])
def test_comfy_layer_sets(sd15, weight_type, by_t):
    expected = np.array([by_t.get(t, 0.0) for t in COMFY_T])
    got = ip_adapter.layer_scales(sd15, 1.0, weight_type=weight_type, composition_weight=0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_instantstyle_recipes_on_sd15(sd15):
    names = [c.name for c in sd15.cross_attention_layers()]
    style = ip_adapter.layer_scales(sd15, {"up": {"block_1": [0.0, 1.0, 0.0]}})
    assert [names[i] for i in np.flatnonzero(style)] == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    both = ip_adapter.layer_scales(sd15, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}})
    assert [names[i] for i in np.flatnonzero(both)] == ["down_blocks.2.attentions.1.transformer_blocks.0.attn2",
                                                        "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    everything_but_mid = ip_adapter.layer_scales(sd15, {"down": 1.0, "up": 1.0})
    assert everything_but_mid.sum() == 15 and everything_but_mid[15] == 0


@pytest.mark.parametrize("scale, match", [
    ({"up": {"block_0": [1.0]}}, r"up blocks with attention are \['block_1', 'block_2', 'block_3'\]"),
    ({"down": {"block_1": [1.0, 0.0, 1.0]}}, "has 3 entries; the block has 2 attentions"),
    ({"left": 1.0}, "'down', 'mid', 'up'"),
    ([1.0, 2.0], "16 entries"),
])
def test_bad_scales(sd15, scale, match):
    with pytest.raises(ValueError, match=match):
        ip_adapter.layer_scales(sd15, scale)


def test_unknown_weight_type(sd15):
    with pytest.raises(ValueError, match="unknown weight type 'sideways'"):
        ip_adapter.layer_scales(sd15, 1.0, weight_type="sideways")


def test_combine_modes():
    e = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(ip_adapter.combine_embeds(e, "concat"), e)
    np.testing.assert_allclose(ip_adapter.combine_embeds(e, "add"), e.sum(0)[None], rtol=1e-6)
    np.testing.assert_allclose(ip_adapter.combine_embeds(e, "subtract"), (e[0] - (e[1] + e[2]) / 2)[None], rtol=1e-5)
    np.testing.assert_allclose(ip_adapter.combine_embeds(e, "average"), e.mean(0)[None], rtol=1e-5)
    norm = np.sqrt((e.astype(np.float64) ** 2).sum(0))     # per element, across the 3 images
    np.testing.assert_allclose(ip_adapter.combine_embeds(e, "norm average"), (e / norm).mean(0)[None], rtol=1e-5)
    with pytest.raises(ValueError, match="'blend'"):
        ip_adapter.combine_embeds(e, "blend")


@pytest.mark.parametrize("steps, start, end", [(10, 0.0, 1.0), (10, 0.2, 0.7), (7, 0.5, 1.0), (4, 0.0, 0.0)])
def test_schedule_gates(steps, start, end):
    expected = [1.0 if start <= i / steps and (i / steps < end or end == 1.0) else 0.0 for i in range(steps)]
    np.testing.assert_array_equal(ip_adapter.schedule_gates(steps, start, end), expected)
    with pytest.raises(ValueError, match="start <= end"):
        ip_adapter.schedule_gates(steps, 0.8, 0.2)


@pytest.mark.parametrize("shape, out", [((64, 64), (8, 8)), ((48, 80), (5, 13)), ((7, 9), (20, 11))])
def test_resize_mask_matches_torch_bicubic(shape, out):
    m = np.random.default_rng(0).uniform(size=(2, *shape)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(m)[None], size=out, mode="bicubic")[0].numpy()
    np.testing.assert_allclose(ip_adapter.resize_mask(m, *out), expected, atol=1e-5)


def test_mask_pyramid_covers_every_resolution(sd15):
    masks = np.ones((2, 512, 768), np.float32)
    pyramid = ip_adapter.mask_pyramid(masks, sd15, 64, 96)
    assert sorted(pyramid) == [8 * 12, 16 * 24, 32 * 48, 64 * 96]
    assert all(v.shape == (1, 2, q) for q, v in pyramid.items())
