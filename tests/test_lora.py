"""LoRA files merged into the weights at load (``ipadapter_jax.convert.lora``)
against diffusers' ``load_lora_weights`` + ``fuse_lora`` (PyTorch, float32):
every fused UNet / text-encoder weight <= 1e-6 relative, a UNet forward <= 1e-4.

* kohya SD 1.x (diffusers module names with ``_``, ``lora_te_``, ``.alpha``),
  a diffusers / PEFT file written by ``save_lora_weights`` (with its
  ``lora_adapter_metadata``: ``lora_alpha``, ``alpha_pattern``, a 1x1 conv
  ``proj_in``), both at scale 0.8, and the two together with their own scales;
* kohya SDXL UNet (sgm / LDM names, LoCon on ResNet and sampler convolutions)
  on an SDXL-shaped UNet (first block without attention, lpb 2);
* kohya SDXL text encoders (``lora_te1_`` / ``lora_te2_``) and LoCon (no alpha,
  alpha 0) against the formula in NumPy: diffusers drops SDXL kohya text
  attention LoRA (REFERENCE.md) and treats a missing alpha as the file's first
  alpha;
* ``sgm_to_diffusers`` on the real SD 1.5 and SDXL configs, written out by hand;
* bad input: missing layer (and ``lenient``), rank / shape mismatch, shapes no
  pair has (rank 0, 1-D, 3-D: refused when read, naming the key), SDXL LoRA on
  SD 1.5 and the reverse, another network type, not a LoRA file, a half pair;
  an upper-case ``.SAFETENSORS`` suffix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import ipadapter_fixtures as fx
import sd_fixtures
from helpers import nchw, nhwc, rel_err
from ipadapter_jax.convert.lora import apply_lora, apply_lora_to_models, parse_lora_spec, read_lora, sgm_to_diffusers
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, Unsupported
from ipadapter_jax.io.params import module_state_dict
from ipadapter_jax.models import CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel
from ipadapter_jax.models.conditioning import UNetConditioning
from ipadapter_jax.models.unet import UNetConfig
from ipadapter_jax.pipeline import StableDiffusionPipeline

pytest.importorskip("peft")   # diffusers' LoRA loading runs on peft

WEIGHT_TOL = 1e-6
FORWARD_TOL = 1e-4
# An SDXL-shaped UNet: no attention in the first block, lpb 2, two transformer layers, text_time conditioning.
SDXL_LIKE_UNET = dict(fx.SDXL_UNET, layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def _pair(rng, name: str, out: int, inn: int, *, rank: int = 2, kernel: int | None = None,
          alpha: float | None = None) -> dict:
    """One kohya layer: lora_down [r, in(, k, k)], lora_up [out, r(, 1, 1)], optional alpha."""
    down_shape = (rank, inn) if kernel is None else (rank, inn, kernel, kernel)
    up_shape = (out, rank) if kernel is None else (out, rank, 1, 1)
    layer = {f"{name}.lora_down.weight": (rng.standard_normal(down_shape) / np.sqrt(inn)).astype(np.float32),
             f"{name}.lora_up.weight": (rng.standard_normal(up_shape) * 0.5).astype(np.float32)}
    if alpha is not None:
        layer[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return layer


def _kohya_sd15(seed: int) -> dict:
    """A kohya SD 1.x LoRA on the fixture UNet (channels 32/64, context 64) and text encoder (64 wide)."""
    rng = np.random.default_rng(seed)
    out = {}
    for block, ch in (("down_blocks_0_attentions_0", 32), ("up_blocks_1_attentions_1", 32),
                      ("mid_block_attentions_0", 64)):
        for proj in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_out_0"):
            out |= _pair(rng, f"lora_unet_{block}_transformer_blocks_0_{proj}", ch, ch, alpha=1.0)
        for proj in ("attn2_to_k", "attn2_to_v"):
            out |= _pair(rng, f"lora_unet_{block}_transformer_blocks_0_{proj}", ch, 64, alpha=1.0)
        out |= _pair(rng, f"lora_unet_{block}_transformer_blocks_0_ff_net_0_proj", 8 * ch, ch, rank=4, alpha=3.0)
        out |= _pair(rng, f"lora_unet_{block}_transformer_blocks_0_ff_net_2", ch, 4 * ch, rank=4, alpha=3.0)
        out |= _pair(rng, f"lora_unet_{block}_proj_in", ch, ch, kernel=1, alpha=1.0)   # 1x1 conv (no linear proj)
    for layer in (0, 1):
        for proj in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
            out |= _pair(rng, f"lora_te_text_model_encoder_layers_{layer}_{proj}", 64, 64, alpha=1.0)
        out |= _pair(rng, f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1", 96, 64, alpha=1.0)
        out |= _pair(rng, f"lora_te_text_model_encoder_layers_{layer}_mlp_fc2", 64, 96, alpha=1.0)
    return out


def _peft_file(sd_folder: Path, path: Path) -> Path:
    """A diffusers / PEFT LoRA made by peft on the diffusers models (random A and B)
    and written by ``save_lora_weights`` with its adapter metadata."""
    from diffusers import StableDiffusionPipeline as TorchSD
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel as TorchCLIP

    torch.manual_seed(3)
    unet = TorchUNet.from_pretrained(sd_folder / "unet")
    text = TorchCLIP.from_pretrained(sd_folder / "text_encoder")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, alpha_pattern={"to_k": 2},
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    # transformers' own add_adapter wants a newer peft than PyPI has; peft injects the same layers.
    text_config = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc2"])
    inject_adapter_in_model(text_config, text)
    TorchSD.save_lora_weights(path.parent, weight_name=path.name,
                              unet_lora_layers=get_peft_model_state_dict(unet),
                              text_encoder_lora_layers=get_peft_model_state_dict(text),
                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
                              text_encoder_lora_adapter_metadata=text_config.to_dict())
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sd")
    folder = sd_fixtures.build_pipeline_folder(root)["sd"]
    files = {"kohya": root / "kohya.safetensors", "kohya2": root / "kohya2.safetensors",
             "peft": _peft_file(folder, root / "peft.safetensors")}
    save_file(_kohya_sd15(1), files["kohya"])
    save_file(_kohya_sd15(2), files["kohya2"])
    return folder, files


def _ours(folder: Path, xl: bool = False, parts=("unet", "text_encoder", "text_encoder_2")) -> dict:
    """Our models of a folder (``parts`` of them: a LoRA for one part need not load the others)."""
    load = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection if xl else None}
    return {part: load[part].from_pretrained(folder / part) for part in parts if load[part] is not None}


def _fused_reference(folder: Path, loras: list[tuple[Path, float]], xl: bool = False):
    """diffusers: load_lora_weights each file, fuse with its scale, unload the LoRA layers."""
    from diffusers import StableDiffusionPipeline as TorchSD
    from diffusers import StableDiffusionXLPipeline as TorchXL

    pipe = (TorchXL if xl else TorchSD).from_pretrained(folder, **({} if xl else {"safety_checker": None}))
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe


def _torch_state(module) -> dict[str, np.ndarray]:
    return {k.removeprefix("text_model."): v.detach().numpy() for k, v in module.state_dict().items()
            if not k.endswith("position_ids")}


def _ours_state(module) -> dict[str, np.ndarray]:
    return {k.removeprefix("text_model."): v for k, v in module_state_dict(module).items()}


def _compare(ours, reference, base) -> tuple[float, int]:
    """(worst relative error over every tensor, how many tensors the LoRA changed)."""
    ours_sd, ref_sd, base_sd = _ours_state(ours), _torch_state(reference), _torch_state(base)
    assert ours_sd.keys() == ref_sd.keys()
    worst = max(rel_err(ours_sd[k], ref_sd[k]) for k in ref_sd if np.any(ref_sd[k]))
    changed = sum(rel_err(ref_sd[k], base_sd[k]) > 1e-3 for k in ref_sd if np.any(base_sd[k]))
    return worst, changed


def _base_torch(folder: Path, xl: bool = False):
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextModel as TorchCLIP
    from transformers import CLIPTextModelWithProjection as TorchCLIPProj

    base = {"unet": TorchUNet.from_pretrained(folder / "unet"),
            "text_encoder": TorchCLIP.from_pretrained(folder / "text_encoder")}
    if xl:
        base["text_encoder_2"] = TorchCLIPProj.from_pretrained(folder / "text_encoder_2")
    return base


def _unet_forward_err(ours, torch_unet, *, xl: bool) -> float:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999, 251], np.int64)
    width = sum(fx.SDXL_TEXT_WIDTHS) if xl else fx.UNET["cross_attention_dim"]
    context = rng.standard_normal((2, 7, width)).astype(np.float32)
    added = ({"text_embeds": rng.standard_normal((2, fx.SDXL_POOLED)).astype(np.float32),
              "time_ids": fx.sdxl_time_ids(2)} if xl else None)
    kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if xl else {}
    with torch.no_grad():
        expected = nhwc(torch_unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs).sample)
    actual = ours(x, t, UNetConditioning(context, added_cond=added)) if xl else ours(x, t, context)
    return rel_err(np.asarray(actual), expected)


# --------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_lora_sd15_matches_diffusers(sd, kind):
    folder, files = sd
    models = _ours(folder)
    report = apply_lora_to_models(models, files[kind], 0.8)
    assert report.format == kind and not report.skipped
    reference = _fused_reference(folder, [(files[kind], 0.8)])
    base = _base_torch(folder)
    for component in ("unet", "text_encoder"):
        worst, changed = _compare(models[component], getattr(reference, component), base[component])
        assert changed == len(report.applied[component]) > 0, component   # the LoRA did change these weights
        assert worst <= WEIGHT_TOL, (component, worst)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")   # peft: two adapters, as intended
def test_two_loras_through_the_pipeline_match_diffusers(sd):
    """kohya at 0.8 and PEFT at 0.5 on our pipeline: fused weights, a UNet forward, and the
    text encoder's output through the pipeline's jitted text stage."""
    folder, files = sd
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    reports = [apply_lora(pipe, files["kohya"], 0.8), apply_lora(pipe, files["peft"], scale=0.5)]
    assert [r.scale for r in reports] == [0.8, 0.5]
    reference = _fused_reference(folder, [(files["kohya"], 0.8), (files["peft"], 0.5)])
    base = _base_torch(folder)
    for component in ("unet", "text_encoder"):
        worst, changed = _compare(getattr(pipe, component), getattr(reference, component), base[component])
        assert changed > 0 and worst <= WEIGHT_TOL, (component, worst)
    assert _unet_forward_err(pipe.unet, reference.unet, xl=False) <= FORWARD_TOL
    prompt = ["the red thing", "a"]
    with torch.no_grad():
        expected, _ = reference.encode_prompt(prompt, "cpu", 1, False)
    assert rel_err(pipe.encode_prompt(prompt), expected.numpy()) <= 1e-5


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import UNet2DConditionModel as TorchUNet
    from test_sdxl_pipeline import build_sdxl_folder

    root = tmp_path_factory.mktemp("lora_sdxl")
    folder = build_sdxl_folder(root)["sdxl"]
    torch.manual_seed(4)
    TorchUNet(**SDXL_LIKE_UNET).save_pretrained(folder / "unet")
    return folder


def _kohya_sdxl_unet(rng) -> dict:
    """sgm names on SDXL_LIKE_UNET, written from the LDM layout by hand: input_blocks 1-2 =
    down 0 resnets, 3 = its downsampler (op), 4-5 = down 1 resnets (.0) + attentions (.1);
    output_blocks 0-2 = up 0 (upsampler at 2.2), 3-5 = up 1 (no attention); input_blocks.0.0 and
    out.2 = conv_in and conv_out."""
    u, ctx = "lora_unet_", sum(fx.SDXL_TEXT_WIDTHS)
    layers = [("input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, None),
              ("input_blocks_5_1_transformer_blocks_1_attn2_to_k", 64, ctx, None),
              ("input_blocks_5_1_proj_in", 64, 64, None),
              ("middle_block_1_transformer_blocks_0_ff_net_0_proj", 512, 64, None),
              ("middle_block_1_transformer_blocks_1_attn2_to_v", 64, ctx, None),
              ("output_blocks_0_1_transformer_blocks_1_attn1_to_out_0", 64, 64, None),
              ("output_blocks_2_1_proj_out", 64, 64, None),
              ("input_blocks_1_0_in_layers_2", 32, 32, 3), ("input_blocks_2_0_emb_layers_1", 32, 128, None),
              ("input_blocks_3_0_op", 32, 32, 3), ("input_blocks_4_0_skip_connection", 64, 32, 1),
              ("middle_block_2_out_layers_3", 64, 64, 3), ("output_blocks_2_2_conv", 64, 64, 3),
              ("output_blocks_3_0_skip_connection", 32, 96, 1), ("output_blocks_5_0_in_layers_2", 32, 64, 3),
              ("time_embed_0", 128, 32, None), ("label_emb_0_0", 128, fx.SDXL_POOLED + 6 * fx.SDXL_TIME_DIM, None),
              ("input_blocks_0_0", 32, 4, 3), ("out_2", 4, 32, 3)]   # conv_in, conv_out
    out = {}
    for name, n_out, n_in, kernel in layers:
        out |= _pair(rng, u + name, n_out, n_in, kernel=kernel, alpha=1.0)
    return out


def test_kohya_sdxl_unet_matches_diffusers(sdxl, tmp_path):
    path = tmp_path / "sdxl_unet.safetensors"
    save_file(_kohya_sdxl_unet(np.random.default_rng(7)), path)
    models = _ours(sdxl, xl=True, parts=("unet",))
    report = apply_lora_to_models(models, path, 0.8)
    reference = _fused_reference(sdxl, [(path, 0.8)], xl=True)
    worst, changed = _compare(models["unet"], reference.unet, _base_torch(sdxl)["unet"])
    assert changed == len(report.applied["unet"]) == 19 and not report.skipped
    assert worst <= WEIGHT_TOL
    assert _unet_forward_err(models["unet"], reference.unet, xl=True) <= FORWARD_TOL


def _expected(base: np.ndarray, layer: dict, name: str, scale: float) -> np.ndarray:
    """kohya's formula in NumPy: W + scale * alpha / rank * up @ down (alpha missing or 0 -> rank)."""
    down, up = layer[f"{name}.lora_down.weight"], layer[f"{name}.lora_up.weight"]
    rank = down.shape[0]
    alpha = float(layer.get(f"{name}.alpha", 0.0)) or rank
    delta = (up.reshape(up.shape[0], rank).astype(np.float64) @ down.reshape(rank, -1)).reshape(base.shape)
    return base + scale * alpha / rank * delta


def test_kohya_sdxl_text_encoders_against_formula(sdxl, tmp_path):
    rng = np.random.default_rng(8)
    w1, w2 = fx.SDXL_TEXT_WIDTHS
    names = {}
    for prefix, width, hidden, component in (("lora_te1_", w1, 64, "text_encoder"),
                                             ("lora_te2_", w2, 96, "text_encoder_2")):
        for proj in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
            names[f"{prefix}text_model_encoder_layers_1_{proj}"] = (component, width, width)
        names[f"{prefix}text_model_encoder_layers_2_mlp_fc1"] = (component, hidden, width)
        names[f"{prefix}text_model_encoder_layers_0_mlp_fc2"] = (component, width, hidden)
    lora = {}
    for name, (_, n_out, n_in) in names.items():
        lora |= _pair(rng, name, n_out, n_in, rank=3, alpha=2.0)
    path = tmp_path / "sdxl_te.safetensors"
    save_file(lora, path)
    models = _ours(sdxl, xl=True, parts=("text_encoder", "text_encoder_2"))
    apply_lora_to_models(models, path, 0.8)
    base = _base_torch(sdxl, xl=True)
    checked = 0
    for name, (component, _, _) in names.items():
        module = name.split("_", 2)[2].replace("text_model_encoder_layers_", "encoder.layers.")
        module = module.replace("_self_attn_", ".self_attn.").replace("_mlp_", ".mlp.")
        key = f"{module}.weight"
        expected = _expected(_torch_state(base[component])[key], lora, name, 0.8)
        assert rel_err(_ours_state(models[component])[key], expected) <= WEIGHT_TOL, name
        checked += 1
    assert checked == 12


def test_locon_against_numpy(sd, tmp_path):
    """Conv LoRA on ResNet 3x3 convs, a 1x1 conv_shortcut, the down- and up-sampler convs,
    time_emb_proj and a 2-D LoRA on the 1x1 conv proj_out; no alpha and alpha 0 both mean alpha = rank."""
    folder, _ = sd
    rng = np.random.default_rng(9)
    layers = {"down_blocks.0.resnets.0.conv1": (32, 32, 3, None), "down_blocks.1.resnets.0.conv2": (64, 64, 3, 0.0),
              "down_blocks.1.resnets.0.conv_shortcut": (64, 32, 1, 5.0),
              "down_blocks.0.downsamplers.0.conv": (32, 32, 3, 1.0), "up_blocks.0.upsamplers.0.conv": (64, 64, 3, None),
              "up_blocks.1.resnets.1.conv1": (32, 64, 3, 2.0), "down_blocks.1.resnets.0.time_emb_proj": (64, 128, None, 3.0),
              "down_blocks.0.attentions.0.proj_out": (32, 32, None, 1.0)}   # a linear LoRA on a 1x1 conv
    lora = {}
    for module, (n_out, n_in, kernel, alpha) in layers.items():
        lora |= _pair(rng, "lora_unet_" + module.replace(".", "_"), n_out, n_in, rank=4, kernel=kernel, alpha=alpha)
    path = tmp_path / "locon.safetensors"
    save_file(lora, path)
    models = _ours(folder, parts=("unet",))
    apply_lora_to_models(models, path, 0.7)
    ours, base = _ours_state(models["unet"]), _torch_state(_base_torch(folder)["unet"])
    for module in layers:
        key = f"{module}.weight"
        expected = _expected(base[key], lora, "lora_unet_" + module.replace(".", "_"), 0.7)
        assert rel_err(ours[key], expected) <= WEIGHT_TOL, key
        assert rel_err(expected, base[key]) > 1e-2, key


def test_sgm_names_of_the_real_configs():
    """sgm -> diffusers module paths for the SD 1.5 and SDXL base UNets, from the LDM layout."""
    sd15 = UNetConfig()
    assert sgm_to_diffusers("input_blocks.1.1.transformer_blocks.0.attn1.to_q", sd15) == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sgm_to_diffusers("input_blocks.3.0.op", sd15) == "down_blocks.0.downsamplers.0.conv"
    assert sgm_to_diffusers("input_blocks.11.0.out_layers.3", sd15) == "down_blocks.3.resnets.1.conv2"
    assert sgm_to_diffusers("output_blocks.2.1.conv", sd15) == "up_blocks.0.upsamplers.0.conv"
    assert sgm_to_diffusers("output_blocks.5.2.conv", sd15) == "up_blocks.1.upsamplers.0.conv"
    assert sgm_to_diffusers("output_blocks.3.0.skip_connection", sd15) == "up_blocks.1.resnets.0.conv_shortcut"
    assert sgm_to_diffusers("middle_block.2.emb_layers.1", sd15) == "mid_block.resnets.1.time_emb_proj"
    assert sgm_to_diffusers("input_blocks.12.1.proj_in", sd15) is None
    sdxl = UNetConfig(block_out_channels=(320, 640, 1280), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, use_linear_projection=True)
    assert sgm_to_diffusers("input_blocks.4.1.transformer_blocks.1.attn2.to_k", sdxl) == \
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert sgm_to_diffusers("input_blocks.1.1.proj_in", sdxl) is None   # SDXL's first block has no attention
    assert sgm_to_diffusers("input_blocks.8.1.proj_out", sdxl) == "down_blocks.2.attentions.1.proj_out"
    assert sgm_to_diffusers("input_blocks.6.0.op", sdxl) == "down_blocks.1.downsamplers.0.conv"
    assert sgm_to_diffusers("output_blocks.2.2.conv", sdxl) == "up_blocks.0.upsamplers.0.conv"
    assert sgm_to_diffusers("output_blocks.5.1.transformer_blocks.0.ff.net.2", sdxl) == \
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2"
    assert sgm_to_diffusers("output_blocks.8.0.in_layers.2", sdxl) == "up_blocks.2.resnets.2.conv1"
    assert sgm_to_diffusers("label_emb.0.2", sdxl) == "add_embedding.linear_2"
    assert sgm_to_diffusers("input_blocks.0.0", sdxl) == "conv_in"


# --------------------------------------------------------------------------- bad input

def _unchanged(models, before) -> bool:
    return all(all(np.array_equal(v, before[c][k]) for k, v in module_state_dict(m).items())
               for c, m in models.items())


@pytest.fixture
def sd_models(sd):
    models = _ours(sd[0])
    return models, {c: module_state_dict(m) for c, m in models.items()}


def test_a_layer_the_model_lacks(sd_models, tmp_path):
    models, before = sd_models
    rng = np.random.default_rng(10)
    lora = _pair(rng, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32, alpha=1.0)
    lora |= _pair(rng, "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32)
    path = tmp_path / "extra.safetensors"
    save_file(lora, path)
    with pytest.raises(Incompatible, match=r"1 LoRA layers name modules this model lacks: "
                                           r"lora_unet_down_blocks_7_attentions_0.*lenient"):
        apply_lora_to_models(models, path)
    assert _unchanged(models, before)
    report = apply_lora_to_models(models, path, lenient=True)
    assert report.skipped == ["lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    assert report.applied == {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]}
    assert "skipped 1 layers" in str(report)


def test_rank_and_shape_mismatch(sd_models, tmp_path):
    models, before = sd_models
    rng = np.random.default_rng(11)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = _pair(rng, name, 32, 32, rank=2)
    lora[f"{name}.lora_up.weight"] = rng.standard_normal((32, 3)).astype(np.float32)
    save_file(lora, tmp_path / "rank.safetensors")
    with pytest.raises(Incompatible, match=r"attn1_to_q.*rank mismatch.*rank 2.*expects rank 3"):
        apply_lora_to_models(models, tmp_path / "rank.safetensors")
    save_file(_pair(rng, name, 32, 48), tmp_path / "shape.safetensors")
    with pytest.raises(Incompatible, match=r"attn1_to_q.*\(32, 48\) update.*model's weight is \(32, 32\)"):
        apply_lora_to_models(models, tmp_path / "shape.safetensors")
    assert _unchanged(models, before)


def test_malformed_pairs_named_when_read(sd_models, tmp_path):
    """Shapes no low-rank pair has are refused when the file is read, naming the
    key, before the family check or the model: rank 0, a 1-D down weight (on a
    cross-attention key, whose width the family check reads), a 3-D up weight."""
    models, before = sd_models
    rng = np.random.default_rng(15)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    cases = {"rank0": ({f"{name}.lora_down.weight": np.zeros((0, 64), np.float32),
                        f"{name}.lora_up.weight": np.zeros((32, 0), np.float32)}, BadFile, r"attn2_to_k.*rank 0"),
             "flat": ({f"{name}.lora_down.weight": rng.standard_normal(64).astype(np.float32),
                       f"{name}.lora_up.weight": rng.standard_normal((32, 1)).astype(np.float32)},
                      BadFile, r"attn2_to_k.lora_down.weight.*down \(64,\) / up \(32, 1\).*2-D.*4-D"),
             "3d_up": ({f"{name}.lora_down.weight": rng.standard_normal((2, 64)).astype(np.float32),
                        f"{name}.lora_up.weight": rng.standard_normal((32, 2, 1)).astype(np.float32)},
                       BadFile, r"attn2_to_k.*up \(32, 2, 1\)")}
    for case, (tensors, error, message) in cases.items():
        save_file(tensors, tmp_path / f"{case}.safetensors")
        with pytest.raises(error, match=message):
            apply_lora_to_models(models, tmp_path / f"{case}.safetensors")
        with pytest.raises(error, match=message):
            read_lora(tmp_path / f"{case}.safetensors")
    assert _unchanged(models, before)


def test_upper_case_suffix_keeps_peft_metadata(sd, tmp_path):
    """``.SAFETENSORS``: read as safetensors, its lora_adapter_metadata (alphas) included."""
    upper = tmp_path / "PEFT.SAFETENSORS"
    upper.write_bytes(sd[1]["peft"].read_bytes())
    want = {(layer.component, layer.name): (layer.alpha, layer.rank) for layer in read_lora(sd[1]["peft"]).layers}
    got = {(layer.component, layer.name): (layer.alpha, layer.rank) for layer in read_lora(upper).layers}
    assert got == want and {alpha for alpha, _ in got.values()} == {2.0, 3.0, 8.0}


def test_sdxl_lora_on_sd15_and_the_reverse(sd, sdxl, tmp_path):
    sdxl_file = tmp_path / "sdxl.safetensors"
    save_file(_kohya_sdxl_unet(np.random.default_rng(12)), sdxl_file)
    sd15, xl = _ours(sd[0]), _ours(sdxl, xl=True)   # each check refuses before changing anything
    with pytest.raises(Incompatible, match=r"is an SDXL LoRA \(.*sgm names.*\); this model is SD 1.x/2.x"):
        apply_lora_to_models(sd15, sdxl_file)
    te1 = tmp_path / "te1.safetensors"
    save_file(_pair(np.random.default_rng(13), "lora_te1_text_model_encoder_layers_0_mlp_fc1", 64, 32), te1)
    with pytest.raises(Incompatible, match=r"SDXL LoRA.*lora_te1_.*this model is SD 1.x/2.x"):
        apply_lora_to_models(sd15, te1)
    with pytest.raises(Incompatible, match=r"is an SD 1.x/2.x LoRA \(.*lora_te_.*\); this model is SDXL"):
        apply_lora_to_models(xl, sd[1]["kohya"])
    # A PEFT file names nothing family-specific here: the text-context width tells.
    with pytest.raises(Incompatible, match=r"LoRA for a model with a 64-wide text context.*this model is SDXL "
                                           r"\(two text encoders, cross-attention width 80\)"):
        apply_lora_to_models(xl, sd[1]["peft"])


def test_files_that_are_not_loras(sd_models, tmp_path):
    models, _ = sd_models
    rng = np.random.default_rng(14)
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": rng.standard_normal((4, 4)).astype(np.float32)},
              tmp_path / "loha.safetensors")
    with pytest.raises(Unsupported, match="hada_w1_a.*LoHa"):
        apply_lora_to_models(models, tmp_path / "loha.safetensors")
    save_file({"down_blocks.0.weight": rng.standard_normal((4, 4)).astype(np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(BadFile, match=r"'down_blocks.0.weight' is not a LoRA key"):
        apply_lora_to_models(models, tmp_path / "model.safetensors")
    half = _pair(rng, "lora_te_text_model_encoder_layers_0_mlp_fc1", 96, 64)
    del half["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(BadFile, match="text_model_encoder_layers_0_mlp_fc1' has no up weight"):
        apply_lora_to_models(models, tmp_path / "half.safetensors")
    with pytest.raises(BadArgument, match="LoRA scale must be finite"):
        apply_lora_to_models(models, tmp_path / "half.safetensors", float("nan"))


def test_parse_lora_spec(tmp_path):
    assert parse_lora_spec("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_lora_spec("dir/style.safetensors:0.6") == (Path("dir/style.safetensors"), 0.6)
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"x")
    assert parse_lora_spec(str(odd)) == (odd, 1.0)
    with pytest.raises(BadArgument, match="FILE:SCALE"):
        parse_lora_spec("style.safetensors:strong")
