"""The SDXL model stack against diffusers / transformers (float32, CPU): the
``text_time`` UNet, both text encoders and the prompt they make, a
bigG-style vision tower, and SDXL IP-Adapter files. Relative error <= 1e-5.

The full SDXL UNet is only built abstractly (``nnx.eval_shape`` here, the
``meta`` device in torch): its parameter count and its 70 cross-attention
layers in processor order (official ``ip_adapter.{1,3,...,139}`` keys)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import ipadapter_fixtures as fx
from helpers import nchw, nhwc, rel_err, saved_diffusers
from ipadapter_jax import ip_adapter
from ipadapter_jax.io.errors import BadArgument, BadFile, Unsupported
from ipadapter_jax.io.params import AbstractRngs
from ipadapter_jax.ip_adapter import load_ip_adapter
from ipadapter_jax.models import (CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection,
                                  UNet2DConditionModel)
from ipadapter_jax.models.conditioning import UNetConditioning
from test_ip_adapter import project, write_official

TOL = 1e-5
B, HW, SEQ = 3, (8, 12), 77
BOS, EOS = 998, 999          # the small vocabulary's <|startoftext|> / <|endoftext|> (49406 / 49407)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (every key but _class_name / _diffusers_version).
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

# SDXL's text encoders at small width. Both real configs say eos_token_id 2 (the
# legacy value: pool at the highest id); tokenizer 1 pads with <|endoftext|>,
# tokenizer 2 with "!" (id 0).
TEXT_1 = dict(vocab_size=1000, hidden_size=fx.SDXL_TEXT_WIDTHS[0], intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=24,
              bos_token_id=BOS, eos_token_id=2, pad_token_id=1)
TEXT_2 = dict(vocab_size=1000, hidden_size=fx.SDXL_TEXT_WIDTHS[1], intermediate_size=192, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=fx.SDXL_POOLED,
              bos_token_id=BOS, eos_token_id=2, pad_token_id=1)
PAD_1, PAD_2 = EOS, 0
# OpenCLIP ViT-bigG/14 layout at small width: gelu, head width 104 (not 64), projection != width.
BIGG_VISION = dict(hidden_size=208, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=2,
                   hidden_act="gelu", image_size=28, patch_size=14, projection_dim=40, layer_norm_eps=1e-5)


def token_ids(pad: int, seed: int, batch: int = B, length: int = SEQ) -> np.ndarray:
    """Prompts of random lengths as a CLIP tokenizer pads them to 77: BOS,
    words, EOS, then ``pad`` (EOS for tokenizer 1, 0 for tokenizer 2)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 990, (batch, length))
    for row, n in zip(ids, rng.integers(3, length - 1, batch)):
        row[0], row[n], row[n + 1:] = BOS, EOS, pad
    return ids


def save_and_load(torch_model, folder, cls):
    torch_model.save_pretrained(folder)
    return cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """{1: (transformers CLIPTextModel, ours), 2: (transformers
    CLIPTextModelWithProjection, ours)} at SDXL's two encoder layouts."""
    from transformers import CLIPTextConfig, CLIPTextModel as TorchText, CLIPTextModelWithProjection as TorchProj

    torch.manual_seed(0)
    t1, t2 = TorchText(CLIPTextConfig(**TEXT_1)).eval(), TorchProj(CLIPTextConfig(**TEXT_2)).eval()
    return {1: (t1, save_and_load(t1, tmp_path_factory.mktemp("text_encoder"), CLIPTextModel)),
            2: (t2, save_and_load(t2, tmp_path_factory.mktemp("text_encoder_2"), CLIPTextModelWithProjection))}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return saved_diffusers(tmp_path_factory, "sdxl_unet", "UNet2DConditionModel", fx.SDXL_UNET)


@pytest.fixture(scope="module")
def unet(unet_folder):
    return UNet2DConditionModel.from_pretrained(unet_folder)


def torch_unet(folder):
    from diffusers import UNet2DConditionModel as TorchUNet

    return TorchUNet.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def prompt(encoders):
    """SDXL's prompt from our encoders: context = both encoders'
    ``hidden_states[-2]`` side by side, pooled = encoder 2's ``text_embeds``."""
    out1 = encoders[1][1](token_ids(PAD_1, seed=0))
    out2 = encoders[2][1](token_ids(PAD_2, seed=1))
    context = np.concatenate([np.asarray(out1.hidden_states[-2]), np.asarray(out2.hidden_states[-2])], axis=-1)
    return context, np.asarray(out2.text_embeds)


def unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, *HW, 4), dtype=np.float32), np.array([3, 500, 917])


def added(text_embeds, time_ids):
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def torch_forward(tu, x, t, context, added_cond, image_embeds=None):
    kwargs = {k: torch.from_numpy(np.array(v)) for k, v in added_cond.items()}
    if image_embeds is not None:
        kwargs["image_embeds"] = [torch.from_numpy(e) for e in image_embeds]
    with torch.no_grad():
        return nhwc(tu(nchw(x), torch.from_numpy(t), torch.from_numpy(context), added_cond_kwargs=kwargs).sample)


# --------------------------------------------------------------------------- text encoders

@pytest.mark.parametrize("which", [1, 2])
def test_text_encoder_parity(encoders, which):
    """hidden_states (SDXL uses [-2]), the pooled output and encoder 2's
    text_embeds, with each tokenizer's padding."""
    torch_model, model = encoders[which]
    ids = token_ids(PAD_1 if which == 1 else PAD_2, seed=which)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    out = model(ids)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(mine, theirs) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    # WithProjection outputs carry text_embeds, not the pooled state: ask its inner text model.
    pooling = getattr(torch_model, "text_model", torch_model)
    with torch.no_grad():
        ref_pooled = pooling(torch.from_numpy(ids)).pooler_output
    assert rel_err(out.pooler_output, ref_pooled) <= TOL
    if which == 2:
        assert rel_err(out.text_embeds, ref.text_embeds) <= TOL
        # Pooled at the EOS token: padding with "!" (id 0) puts the highest id there.
        last = np.asarray(out.last_hidden_state)
        eos = (ids == EOS).argmax(-1)
        np.testing.assert_array_equal(np.asarray(out.pooler_output), last[np.arange(B), eos])


def test_text_encoder_2_with_real_eos_id(tmp_path):
    """A config naming the real EOS id pools at its first occurrence, also
    when the padding is EOS (tokenizer 1's) rather than "!"."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection as TorchProj

    torch_model = TorchProj(CLIPTextConfig(**dict(TEXT_2, eos_token_id=EOS))).eval()
    model = save_and_load(torch_model, tmp_path, CLIPTextModelWithProjection)
    for pad in (PAD_1, PAD_2):
        ids = token_ids(pad, seed=5)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
        out = model(ids)
        assert rel_err(out.text_embeds, ref.text_embeds) <= TOL
        assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL


def test_sdxl_prompt_matches_transformers(encoders, prompt):
    """The UNet's context and pooled embedding, built from both encoders."""
    context, pooled = prompt
    with torch.no_grad():
        ref1 = encoders[1][0](torch.from_numpy(token_ids(PAD_1, seed=0)), output_hidden_states=True)
        ref2 = encoders[2][0](torch.from_numpy(token_ids(PAD_2, seed=1)), output_hidden_states=True)
    ref_context = torch.cat([ref1.hidden_states[-2], ref2.hidden_states[-2]], dim=-1).numpy()
    assert context.shape == (B, SEQ, fx.SDXL_UNET["cross_attention_dim"])
    assert rel_err(context, ref_context) <= TOL
    assert rel_err(pooled, ref2.text_embeds) <= TOL


# --------------------------------------------------------------------------- vision tower

def test_bigg_style_vision_tower(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as TorchVision

    torch_model = TorchVision(CLIPVisionConfig(**BIGG_VISION)).eval()
    model = save_and_load(torch_model, tmp_path, CLIPVisionModelWithProjection)
    assert model.vision_model.encoder.layers[0].self_attn.head_dim == 104
    pixels = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(nchw(pixels), output_hidden_states=True)
    out = model(pixels)
    assert rel_err(out.image_embeds, ref.image_embeds) <= TOL
    assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL


# --------------------------------------------------------------------------- UNet

def test_text_time_unet_parity(unet_folder, unet, prompt):
    tu = torch_unet(unet_folder)
    context, pooled = prompt
    x, t = unet_inputs()
    cond = added(pooled, fx.sdxl_time_ids(B))
    expected = torch_forward(tu, x, t, context, cond)
    assert rel_err(unet(x, t, UNetConditioning(context, added_cond=cond)), expected) <= TOL
    # The added conditioning matters: other time ids give another prediction.
    other = unet(x, t, UNetConditioning(context, added_cond=added(pooled, fx.sdxl_time_ids(B, seed=1))))
    assert rel_err(other, expected) > 1e-4


def test_text_time_unet_under_jit(unet, prompt):
    """The conditioning pytree (with its dict) goes through jit; checks run at trace time."""
    graphdef, state = nnx.split(unet)
    step = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    context, pooled = prompt
    x, t = unet_inputs(1)
    cond = UNetConditioning(context, added_cond=added(pooled, fx.sdxl_time_ids(B)))
    assert rel_err(step(state, x, t, cond), unet(x, t, cond)) <= TOL
    with pytest.raises(BadArgument, match="time_ids"):
        step(state, x, t, UNetConditioning(context, added_cond={"text_embeds": pooled}))


def test_small_unet_processor_order(unet_folder, unet):
    """Per-block transformer depth (1, 2): the up blocks take it reversed
    and the mid block the last entry, as in diffusers' attn_processors."""
    tu = torch_unet(unet_folder)
    names = [name.removesuffix(".processor") for name in tu.attn_processors]
    assert [name for name, _ in unet.attention_processors()] == names
    assert [layer.name for layer in unet.cross_attention_layers()] == [n for n in names if n.endswith("attn2")]
    depth = {layer.name.rsplit(".transformer_blocks", 1)[0] for layer in unet.cross_attention_layers()
             if ".transformer_blocks.1." in layer.name}
    assert depth == {"down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
                     "mid_block.attentions.0"}


SameKey = AbstractRngs   # every draw the same key: the abstract build takes seconds, not a minute


@pytest.fixture(scope="module")
def official_sdxl():
    """The official SDXL UNet config, built abstractly on both sides."""
    from diffusers import UNet2DConditionModel as TorchUNet

    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(SDXL_UNET, rngs=SameKey()))
    with torch.device("meta"):
        reference = TorchUNet(**SDXL_UNET)
    return abstract, reference


def test_official_sdxl_parameter_count(official_sdxl):
    abstract, reference = official_sdxl
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == sum(p.numel() for p in reference.parameters()) == 2_567_463_684


def test_official_sdxl_cross_attention_layers(official_sdxl):
    """70 layers in processor order (down, up, mid): official adapter keys
    ip_adapter.{1,3,...,139}, down 1-47, up 49-119, mid 121-139."""
    abstract, reference = official_sdxl
    names = [name.removesuffix(".processor") for name in reference.attn_processors]
    assert [name for name, _ in abstract.attention_processors()] == names
    layers = abstract.cross_attention_layers()
    assert [layer.name for layer in layers] == [n for n in names if n.endswith("attn2")]
    assert len(layers) == 70
    keys = {group: [2 * layer.index + 1 for layer in layers if layer.group == group] for group in ("down", "up", "mid")}
    assert keys["down"] == list(range(1, 48, 2)) and keys["up"] == list(range(49, 120, 2))
    assert keys["mid"] == list(range(121, 140, 2))
    for layer in layers:
        attn = reference.get_submodule(layer.name)
        assert (layer.hidden_size, layer.token_dim) == (attn.to_q.out_features, attn.to_k.in_features)
        assert layer.attention.heads == attn.heads, layer.name          # 64-wide heads throughout
    assert {layer.token_dim for layer in layers} == {2048}


# --------------------------------------------------------------------------- errors

def test_text_time_unet_errors(unet, prompt):
    context, pooled = prompt
    x, t = unet_inputs()
    ids = fx.sdxl_time_ids(B)
    with pytest.raises(BadArgument, match=r"text_time.*added_cond"):
        unet(x, t, context)
    with pytest.raises(BadArgument, match=r"missing \['time_ids'\]"):
        unet.conditioning(UNetConditioning(context, added_cond={"text_embeds": pooled}))
    with pytest.raises(BadArgument, match=r"missing \['text_embeds'\]"):
        unet.conditioning(UNetConditioning(context, added_cond={"time_ids": ids}))
    with pytest.raises(BadArgument, match=r"unexpected \['image_embeds'\]"):
        unet.conditioning(UNetConditioning(context, added_cond={**added(pooled, ids), "image_embeds": pooled}))
    with pytest.raises(BadArgument, match=r"time_ids width 5 .*projection_class_embeddings_input_dim is 88"):
        unet.conditioning(UNetConditioning(context, added_cond=added(pooled, ids[:, :5])))
    with pytest.raises(BadArgument, match=r"text_embeds width 48 .*projection_class_embeddings_input_dim"):
        unet.conditioning(UNetConditioning(context, added_cond=added(np.zeros((B, 48), np.float32), ids)))
    with pytest.raises(BadArgument, match=r"added_cond\['text_embeds'\] must be \[B, width\] .*\(3\)"):
        unet(x, t, UNetConditioning(context, added_cond=added(pooled[:2], ids[:2])))


def test_added_cond_config_and_sd_unet_errors():
    small = dict(fx.SDXL_UNET)
    with pytest.raises(Unsupported, match="addition_embed_type='text'"):
        UNet2DConditionModel.parse_config(dict(small, addition_embed_type="text"))
    with pytest.raises(BadFile, match="projection_class_embeddings_input_dim"):
        UNet2DConditionModel.parse_config(dict(small, projection_class_embeddings_input_dim=None))
    with pytest.raises(BadFile, match="addition_time_embed_dim must be"):
        UNet2DConditionModel.parse_config(dict(small, addition_time_embed_dim=0))
    # A UNet without added conditioning refuses it.
    plain = {k: v for k, v in small.items() if "addition" not in k and "projection_class" not in k}
    sd = nnx.eval_shape(lambda: UNet2DConditionModel(plain, rngs=nnx.Rngs(0)))
    assert sd.add_embedding is None
    cond = UNetConditioning(np.zeros((1, 2, 80), np.float32),
                            added_cond=added(np.zeros((1, 40), np.float32), fx.sdxl_time_ids(1)))
    with pytest.raises(BadArgument, match="no added conditioning"):
        sd.conditioning(cond)


# --------------------------------------------------------------------------- IP-Adapters

def image_embeds_for(variant, seed=3):
    rng = np.random.default_rng(seed)
    if variant == "base":
        return rng.standard_normal((B, 1, fx.CLIP_DIM), dtype=np.float32)
    return rng.standard_normal((B, 1, fx.CLIP_TOKENS, fx.CLIP_HIDDEN), dtype=np.float32)


@pytest.mark.parametrize("variant, filename", [("base", "ip-adapter_sdxl.safetensors"),
                                               ("plus", "ip-adapter-plus_sdxl_vit-h.bin")])
def test_sdxl_ip_adapter_parity(unet_folder, prompt, tmp_path, variant, filename):
    tu = torch_unet(unet_folder)
    c = fx.SDXL_UNET["cross_attention_dim"]
    proj, ip = fx.image_proj(variant, c), fx.ip_layers(tu)
    assert sorted(int(k.split(".")[0]) for k in ip if k.endswith("to_k_ip.weight")) == list(range(1, 22, 2))
    path = write_official(tmp_path, proj, ip, filename)
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)

    model = UNet2DConditionModel.from_pretrained(unet_folder)
    adapter = load_ip_adapter(path, model)
    assert adapter.variant == variant
    embeds = image_embeds_for(variant)
    tokens = project(adapter, embeds)
    with torch.no_grad():
        ref_tokens = tu.encoder_hid_proj([torch.from_numpy(embeds)])[0].numpy()
    assert rel_err(tokens, ref_tokens) <= TOL

    context, pooled = prompt
    x, t = unet_inputs(2)
    cond = added(pooled, fx.sdxl_time_ids(B, seed=2))
    expected = torch_forward(tu, x, t, context, cond, image_embeds=[embeds])
    image_prompt = ip_adapter.image_prompt(adapter, tokens, 1.0, unet=model)
    out = model(x, t, UNetConditioning(context, (image_prompt,), added_cond=cond))
    assert rel_err(out, expected) <= TOL
    # The image branch contributes: without it the prediction is far off.
    assert rel_err(model(x, t, UNetConditioning(context, added_cond=cond)), expected) > 1e-3
