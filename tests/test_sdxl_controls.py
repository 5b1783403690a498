"""IP-Adapter controls and pairings on SDXL.

* ComfyUI_IPAdapter_plus weight types on SDXL's block order: ComfyUI weighs by
  ``transformer_index`` (one per SpatialTransformer = diffusers
  Transformer2DModel, input -> middle -> output), so SDXL's 70 layers share 11
  weights. The expected per-layer weights are derived here from ComfyUI's own
  patch loop (``IPAdapterPlus.py``: input blocks 4, 5, 7, 8, output blocks
  0-5, middle, with their transformer depths, numbered as the official keys)
  and its weight tables, on the official SDXL UNet and on a small UNet with
  SDXL's block structure.
* diffusers' per-block dict scales (InstantStyle) against diffusers' own
  ``set_ip_adapter_scale`` on the same UNets (the scale each IP processor gets),
  and one UNet forward with a style + layout dict against diffusers (<= 1e-5).
* Wrong pairings, each a clear error naming what is needed: SDXL adapters on
  SD 1.5 and the reverse, ViT-H adapters given bigG features and the reverse,
  an SDXL folder without text_encoder_2.
"""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import ipadapter_fixtures as fx
from helpers import nchw, nhwc, rel_err, saved_diffusers
from ipadapter_jax import ip_adapter
from ipadapter_jax.io.errors import Incompatible, MissingFile, Unsupported
from ipadapter_jax.ip_adapter import IPAdapter, load_ip_adapter, prompt_tokens
from ipadapter_jax.ip_adapter.image_proj import ImageProjModel
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.models.conditioning import UNetConditioning
from ipadapter_jax.pipeline import StableDiffusionXLPipeline, load_pipeline, pipeline_class
from test_ip_adapter import write_official
from test_sdxl_models import SDXL_UNET, SameKey
from test_unet_sd15_full import SD15_UNET_CONFIG

# A small UNet with SDXL's block structure: [Down, CrossAttn, CrossAttn] down blocks, two
# layers per block, per-block transformer depths (SDXL: 1, 2, 10; here 1, 1, 2, the mid
# block taking the last), so 4 + 1 + 6 = 11 transformers as in SDXL, holding 17 layers.
SDXL_LIKE = dict(block_out_channels=(16, 32, 64), layers_per_block=2, norm_num_groups=8,
                 attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 cross_attention_dim=sum(fx.SDXL_TEXT_WIDTHS),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=fx.SDXL_TIME_DIM,
                 projection_class_embeddings_input_dim=fx.SDXL_POOLED + 6 * fx.SDXL_TIME_DIM, sample_size=8)


def abstract_unet(config):
    return nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=SameKey()))


@pytest.fixture(scope="module")
def sdxl():
    """The official SDXL UNet's structure (no weights allocated)."""
    return abstract_unet(SDXL_UNET)


@pytest.fixture(scope="module")
def sd15():
    return abstract_unet(SD15_UNET_CONFIG)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return saved_diffusers(tmp_path_factory, "sdxl_like_unet", "UNet2DConditionModel", SDXL_LIKE)


@pytest.fixture(scope="module")
def small(small_folder):
    return UNet2DConditionModel.from_pretrained(small_folder)


# --------------------------------------------------------------------------- ComfyUI weight types

def comfy_sdxl_layers(depth_in, depth_mid, depth_out):
    """(block type, transformer_index) of each cross-attention layer in ComfyUI's
    SDXL patch order (``IPAdapterPlus.py``: input blocks 4, 5, 7, 8, output blocks
    0-5, then the middle block; module_key = 2 * position + 1, the official key
    order). At run time ``transformer_index`` counts SpatialTransformers in forward
    order: input 4, 5, 7, 8 -> 0-3, middle -> 4, output 0-5 -> 5-10."""
    layers = []
    for t, block in enumerate([4, 5, 7, 8]):
        layers += [("input", t)] * depth_in[block]
    for block in range(6):
        layers += [("output", 5 + block)] * depth_out[block]
    return layers + [("middle", 4)] * depth_mid


# ComfyUI's SDXL tables (IPAdapterPlus.py, is_sdxl): transformer_index -> weight, for
# weight w = 0.9 and composition weight c = 0.4.
W, C = 0.9, 0.4
COMFY_SDXL_TABLES = {
    "style transfer": {6: W},
    "composition": {3: W},
    "strong style transfer": {0: W, 1: W, 2: W, 4: W, 5: W, 6: W, 7: W, 8: W, 9: W, 10: W},
    "style and composition": {3: C, 6: W},
    "strong style and composition": {0: W, 1: W, 2: W, 3: C, 4: W, 5: W, 6: W, 7: W, 8: W, 9: W, 10: W},
}


def comfy_expected(weight_type, layers):
    """ComfyUI's ``ipadapter_attention`` weight for each (block type, t), with
    ``layers = 11`` (its count for SDXL adapters)."""
    n = 11
    out = []
    for block, t in layers:
        w = {"linear": W, "ease in": W * (0.05 + 0.95 * (1 - t / n)), "ease out": W * (0.05 + 0.95 * (t / n)),
             "ease in-out": W * (0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2))),
             "reverse in-out": W * (0.05 + 0.95 * (abs(t - n / 2) / (n / 2))),
             "weak input": W * 0.2 if block == "input" else W,
             "weak middle": W * 0.2 if block == "middle" else W,
             "weak output": W * 0.2 if block == "output" else W,
             "strong middle": W * 0.2 if block in ("input", "output") else W}.get(weight_type)
        out.append(w if w is not None else COMFY_SDXL_TABLES[weight_type].get(t, 0.0))
    return np.array(out)


# Transformer depths by ComfyUI block id: the official SDXL UNet and SDXL_LIKE.
OFFICIAL_DEPTHS = ({4: 2, 5: 2, 7: 10, 8: 10}, 10, [10, 10, 10, 2, 2, 2])
SMALL_DEPTHS = ({4: 1, 5: 1, 7: 2, 8: 2}, 2, [2, 2, 2, 1, 1, 1])


@pytest.mark.parametrize("weight_type", list(ip_adapter.WEIGHT_TYPES))
@pytest.mark.parametrize("which", ["official", "small"])
def test_comfy_weight_types_on_sdxl(sdxl, small, which, weight_type):
    unet, depths = (sdxl, OFFICIAL_DEPTHS) if which == "official" else (small, SMALL_DEPTHS)
    expected = comfy_expected(weight_type, comfy_sdxl_layers(*depths))
    assert len(expected) == len(unet.cross_attention_layers()) == (70 if which == "official" else 17)
    got = ip_adapter.layer_scales(unet, W, weight_type=weight_type, composition_weight=C)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_comfy_style_and_composition_blocks_on_sdxl(sdxl):
    """ComfyUI's style block is InstantStyle's up_blocks.0.attentions.1, its
    composition block down_blocks.2.attentions.1 (all 10 layers of each)."""
    names = [c.name for c in sdxl.cross_attention_layers()]
    for weight_type, prefix in (("style transfer", "up_blocks.0.attentions.1."),
                                ("composition", "down_blocks.2.attentions.1.")):
        picked = [names[i] for i in np.flatnonzero(ip_adapter.layer_scales(sdxl, 1.0, weight_type=weight_type))]
        assert len(picked) == 10 and all(name.startswith(prefix) for name in picked), picked
    assert ip_adapter.comfy_order(sdxl)[:4] == [0, 0, 1, 1] and ip_adapter.comfy_order(sdxl)[-1] == 4


def test_special_weight_types_need_a_known_layout():
    unet = abstract_unet(fx.SDXL_UNET)           # 2 + 1 + 4 transformers: neither SD nor SDXL
    with pytest.raises(Unsupported, match=r"this UNet has 2 input, 1 middle, 4 output"):
        ip_adapter.layer_scales(unet, 1.0, weight_type="style transfer")
    assert ip_adapter.layer_scales(unet, 1.0, weight_type="ease in").shape == (len(unet.cross_attention_layers()),)


# --------------------------------------------------------------------------- diffusers' per-block dicts

DICT_SCALES = [
    {"up": {"block_0": [0.0, 1.0, 0.0]}},                                          # InstantStyle: style
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},         # style + layout
    {"down": 0.5, "mid": 0.3, "up": {"block_0": 0.7, "block_1": [0.1, 0.2, 0.3]}},
    {"down": {"block_1": [0.25]}, "mid": [0.6]},
    0.8,
]


def with_ip_processors(tu, scale=1.0):
    """diffusers' IP-Adapter processors on every cross-attention layer (no weights needed
    for the scales; created on whatever device the UNet is on)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    processors = {}
    for name in tu.attn_processors:
        attn = tu.get_submodule(name.rsplit(".processor", 1)[0])
        processors[name] = (IPAdapterAttnProcessor2_0(attn.to_q.out_features, tu.config.cross_attention_dim,
                                                      scale=scale, num_tokens=4)
                            if name.endswith("attn2.processor") else AttnProcessor2_0())
    tu.set_attn_processor(processors)
    return tu


def diffusers_scales(tu, scale) -> np.ndarray:
    """The per-layer scales diffusers' ``set_ip_adapter_scale`` gives (processor order)."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=tu), scale)
    return np.array([p.scale[0] for name, p in tu.attn_processors.items() if name.endswith("attn2.processor")])


@pytest.fixture(scope="module")
def torch_official():
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device("meta"):
        return with_ip_processors(TorchUNet(**SDXL_UNET))


@pytest.mark.parametrize("case", range(len(DICT_SCALES)))
def test_block_dicts_match_diffusers_on_sdxl(sdxl, torch_official, small, small_folder, case):
    from diffusers import UNet2DConditionModel as TorchUNet

    scale = DICT_SCALES[case]
    expected = diffusers_scales(torch_official, scale)
    assert expected.shape == (70,)
    np.testing.assert_array_equal(ip_adapter.layer_scales(sdxl, scale), expected.astype(np.float32))
    small_expected = diffusers_scales(with_ip_processors(TorchUNet.from_pretrained(small_folder)), scale)
    np.testing.assert_array_equal(ip_adapter.layer_scales(small, scale), small_expected.astype(np.float32))


def test_instantstyle_dict_forward_matches_diffusers(small, small_folder, tmp_path):
    """Style + layout scales on an SDXL-structured UNet with an adapter, one UNet call
    against diffusers with the same dict set by ``set_ip_adapter_scale``."""
    from diffusers import UNet2DConditionModel as TorchUNet

    tu = TorchUNet.from_pretrained(small_folder).eval()
    c = SDXL_LIKE["cross_attention_dim"]
    proj, ip = fx.image_proj("base", c), fx.ip_layers(tu)
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)
    scale = DICT_SCALES[1]
    diffusers_scales(tu, scale)
    adapter = load_ip_adapter(write_official(tmp_path, proj, ip, "ip-adapter_sdxl.safetensors"), small)
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
        t = np.array([10, 700])
        context = rng.standard_normal((2, 77, c), dtype=np.float32)
        added = {"text_embeds": rng.standard_normal((2, fx.SDXL_POOLED), dtype=np.float32),
                 "time_ids": fx.sdxl_time_ids(2)}
        embeds = rng.standard_normal((2, 1, fx.CLIP_DIM), dtype=np.float32)
        with torch.no_grad():
            kwargs = {k: torch.from_numpy(v) for k, v in added.items()}
            kwargs["image_embeds"] = [torch.from_numpy(embeds)]
            expected = nhwc(tu(nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                               added_cond_kwargs=kwargs).sample)
        tokens = adapter.project(embeds[:, 0])[:, None]
        graphdef, state = nnx.split(small)
        forward = jax.jit(lambda s, c: nnx.merge(graphdef, s)(x, t, c))   # scales are inputs: one compile
        run = lambda scale: forward(state, UNetConditioning(
            context, (ip_adapter.image_prompt(adapter, tokens, scale, unet=small),), added_cond=added))
        assert rel_err(run(scale), expected) <= 1e-5
        assert rel_err(run(1.0), expected) > 1e-3          # the dict matters
    finally:
        ip_adapter.detach_all(small)


# --------------------------------------------------------------------------- wrong pairings

def adapter_file(tmp_path, name, n_layers, token_dim, embed_dim=16):
    """An official-layout base adapter with ``n_layers`` layers of width ``token_dim``
    (tiny hidden width: the pairing is refused before any weight is used)."""
    r = fx.Rand(0)
    ip = {f"{2 * n + 1}.{kv}.weight": r.w(4, token_dim) for n in range(n_layers) for kv in ("to_k_ip", "to_v_ip")}
    proj = {**r.lin("proj", embed_dim, 4 * token_dim), **r.ln("norm", token_dim)}
    return write_official(tmp_path, proj, ip, name)


def test_sdxl_adapter_on_sd15_unet(sd15, tmp_path):
    path = adapter_file(tmp_path, "ip-adapter_sdxl.safetensors", 70, 2048)
    with pytest.raises(Incompatible) as err:
        load_ip_adapter(path, sd15)
    message = str(err.value)
    assert "ip-adapter_sdxl.safetensors: this is an SDXL adapter (70 cross-attention layers of width 2048) but " \
           "the UNet is SD 1.x (16 cross-attention layers of width 768)" in message
    assert "Use an SD 1.x adapter" in message and "_sd15" in message, message
    assert len(sd15.ip_adapters) == 0


def test_sd15_adapter_on_sdxl_unet(sdxl, tmp_path):
    path = adapter_file(tmp_path, "ip-adapter_sd15.bin", 16, 768)
    with pytest.raises(Incompatible, match=r"this is an SD 1.x adapter \(16 cross-attention layers of width 768\) "
                                           r"but the UNet is SDXL \(70 cross-attention layers of width 2048\)\. "
                                           r"Use an SDXL adapter \(the \*_sdxl\* files"):
        load_ip_adapter(path, sdxl)


def test_attach_adapter_built_for_another_base_model(sd15, sdxl):
    adapter = nnx.eval_shape(lambda: IPAdapter.for_unet(sdxl, ImageProjModel(16, 2048, 4, rngs=nnx.Rngs(0)),
                                                        variant="base", rngs=nnx.Rngs(0)))
    with pytest.raises(Incompatible, match=r"SDXL adapter \(70 .* width 2048\) but the UNet is SD 1.x \(16 .* "
                                           r"width 768\)"):
        ip_adapter.attach(sd15, adapter)


def encoder_adapter(tmp_path, small, small_folder, variant, embed_dim):
    """A base (image_embeds) or plus (hidden states) adapter for the small UNet
    whose projection takes CLIP features of width ``embed_dim``."""
    from diffusers import UNet2DConditionModel as TorchUNet

    r, c = fx.Rand(1), SDXL_LIKE["cross_attention_dim"]
    if variant == "base":
        proj = {**r.lin("proj", embed_dim, 4 * c), **r.ln("norm", c)}
    else:
        dim = 64
        proj = {"latents": r.w(1, 4, dim), **r.lin("proj_in", embed_dim, dim), **r.lin("proj_out", dim, c),
                **r.ln("norm_out", c), **fx.perceiver(r, "", dim, 1, heads=1)}
    ip = fx.ip_layers(TorchUNet.from_pretrained(small_folder))
    return load_ip_adapter(write_official(tmp_path, proj, ip), small, attach=False)


# (variant, the adapter's encoder width, the given width, the encoder named as needed)
ENCODER_CASES = [
    ("base", 1024, 1280, "models/image_encoder (OpenCLIP ViT-H/14)", "OpenCLIP ViT-bigG/14, sdxl_models"),
    ("base", 1280, 1024, "sdxl_models/image_encoder (OpenCLIP ViT-bigG/14)", "OpenCLIP ViT-H/14, models"),
    ("plus", 1280, 1664, "models/image_encoder (OpenCLIP ViT-H/14)", "OpenCLIP ViT-bigG/14, sdxl_models"),
    ("plus", 1664, 1280, "sdxl_models/image_encoder (OpenCLIP ViT-bigG/14)", "OpenCLIP ViT-H/14, models"),
]


@pytest.mark.parametrize("variant, width, given, needed, given_name", ENCODER_CASES)
def test_features_of_the_other_image_encoder(tmp_path, small, small_folder, variant, width, given, needed,
                                             given_name):
    adapter = encoder_adapter(tmp_path, small, small_folder, variant, width)
    output = "image_embeds" if variant == "base" else "hidden_states"
    features = np.zeros((1, given) if variant == "base" else (1, 5, given), np.float32)
    with pytest.raises(Incompatible) as err:
        adapter.project(features)
    message = str(err.value)
    assert f"takes CLIP {output} of width {width} (" in message and f"got {given} ({given_name}" in message
    assert message.endswith(f"encode the reference images with {needed}"), message
    # An encoder of the other kind is refused before it runs (its config says its widths).
    config = types.SimpleNamespace(projection_dim=given if variant == "base" else 1,
                                   hidden_size=given if variant == "plus" else 1, image_size=224)
    encoder = types.SimpleNamespace(config=config)
    with pytest.raises(Incompatible, match=f"the image encoder gives {given} \\({given_name}"):
        prompt_tokens(adapter, image_encoder=encoder, images=[np.zeros((8, 8, 3), np.uint8)])


def sdxl_folder_without(tmp_path, missing, model_index=True):
    """An SDXL folder layout lacking one component (the folders are checked before
    anything loads, so they may stay empty)."""
    folder = tmp_path / "sdxl"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        if sub != missing:
            (folder / sub).mkdir(parents=True)
    if model_index:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    else:
        (folder / "unet" / "config.json").write_text(json.dumps(SDXL_UNET))
    return folder


@pytest.mark.parametrize("model_index", [True, False])
def test_sdxl_folder_without_text_encoder_2(tmp_path, model_index):
    folder = sdxl_folder_without(tmp_path, "text_encoder_2", model_index)
    assert pipeline_class(folder) is StableDiffusionXLPipeline       # without model_index.json: the UNet says
    with pytest.raises(MissingFile) as err:
        load_pipeline(folder)
    message = str(err.value)
    assert f"text_encoder_2 folder not found: {folder / 'text_encoder_2'}" in message
    assert f"The SDXL folder {folder} lacks its text_encoder_2 (the second text encoder, OpenCLIP ViT-bigG/14" \
           in message, message
