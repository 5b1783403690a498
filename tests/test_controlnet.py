"""ControlNetModel against diffusers (float32, CPU): every down residual and
the mid residual, relative error <= 1e-5, SD 1.5-style and SDXL-style; the
residuals through the UNet; diffusers folders (fp16 variant, round trip); the
original single-file layout, read by us and by diffusers' own conversion.

The reference models' zero convs are re-drawn at random: with diffusers' zero
init every residual would be 0 and the comparisons could not fail."""

from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import nchw, nhwc, rel_err
from ipadapter_jax.convert.controlnet import (SD15_CONTROLNET_CONFIG, controlnet_to_original, load_controlnet,
                                              original_key, parameter_shapes)
from ipadapter_jax.io import module_state_dict
from ipadapter_jax.io.errors import BadArgument, Incompatible, Unsupported
from ipadapter_jax.io.files import CheckpointError
from ipadapter_jax.models import ControlNetModel, UNet2DConditionModel
from ipadapter_jax.models.conditioning import UNetConditioning

TOL = 1e-5
B, LATENT, SEQ = 2, (6, 10), 7            # non-square latents
WEIGHTS = "diffusion_pytorch_model.safetensors"

# SD 1.5 layout at small width, with the default hint embedding (16, 32, 96, 256):
# diffusers' single-file conversion only knows that one (conv_out at input_hint_block.14).
SD15 = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            layers_per_block=2, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
# SDXL layout (as tests/ipadapter_fixtures.SDXL_UNET): text_time, per-block heads and depths,
# linear projections; a two-level hint embedding (pixels = 2 x latents).
SDXL_POOLED, SDXL_TIME_DIM = 40, 8
SDXL = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            layers_per_block=1, norm_num_groups=8, cross_attention_dim=80, attention_head_dim=(4, 2),
            transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_DIM,
            projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME_DIM,
            conditioning_embedding_out_channels=(16, 32))
# The remaining options: BGR control images, pooled conditions, the resnet-only mid
# block of the small SDXL ControlNets, scale-shift time conditioning, two conditioning channels.
OPTIONS = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
               controlnet_conditioning_channel_order="bgr", global_pool_conditions=True,
               mid_block_type="UNetMidBlock2D",
               resnet_time_scale_shift="scale_shift", conditioning_embedding_out_channels=(8, 16),
               conditioning_channels=2, flip_sin_to_cos=False, freq_shift=1)


ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def reference(config: dict, folder):
    """A diffusers ControlNetModel with random zero convs, saved to ``folder``."""
    from diffusers import ControlNetModel as TorchControlNet

    torch.manual_seed(0)
    model = TorchControlNet(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(ZERO_CONVS):
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return model


def inputs(model, seed: int = 0, latent=LATENT):
    """(sample, timesteps, context, control image) for ``model`` (ours)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((B, *latent, 4), dtype=np.float32)
    context = rng.standard_normal((B, SEQ, cfg.unet.cross_attention_dim), dtype=np.float32)
    image = rng.random((B, latent[0] * cfg.downscale, latent[1] * cfg.downscale, cfg.conditioning_channels),
                       dtype=np.float32)
    return sample, np.array([3, 917]), context, image


def sdxl_added(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"text_embeds": rng.standard_normal((B, SDXL_POOLED), dtype=np.float32),
            "time_ids": np.tile(np.array([[512, 768, 0, 32, 1024, 1024]], np.float32), (B, 1))}


def torch_residuals(model, sample, t, context, image, added=None, **kwargs):
    extra = {} if added is None else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}
    with torch.no_grad():
        down, mid = model(nchw(sample), torch.as_tensor(t), torch.from_numpy(context), nchw(image),
                          return_dict=False, **extra, **kwargs)
    return [nhwc(r) for r in down], nhwc(mid)


def residual_errors(ours, theirs) -> list[float]:
    (down, mid), (t_down, t_mid) = ours, theirs
    assert len(down) == len(t_down)
    return [rel_err(a, b) for a, b in zip(down, t_down)] + [rel_err(mid, t_mid)]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_sd15")
    torch_model = reference(SD15, folder)
    return torch_model, folder, ControlNetModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_sdxl")
    torch_model = reference(SDXL, folder)
    return torch_model, folder, load_controlnet(folder)


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("scale, guess_mode", [(1.0, False), (0.7, False), (0.7, True)])
def test_sd15_residuals(sd15, scale, guess_mode):
    torch_model, _, model = sd15
    x = inputs(model)
    errors = residual_errors(model(*x, conditioning_scale=scale, guess_mode=guess_mode),
                             torch_residuals(torch_model, *x, conditioning_scale=scale, guess_mode=guess_mode))
    assert len(errors) == 7 and max(errors) <= TOL, errors


@pytest.mark.parametrize("scale, guess_mode", [(0.7, False), (0.7, True)])
def test_sdxl_residuals(sdxl, scale, guess_mode):
    torch_model, _, model = sdxl
    x, added = inputs(model, seed=1), sdxl_added()
    errors = residual_errors(model(*x, conditioning_scale=scale, added_cond=added, guess_mode=guess_mode),
                             torch_residuals(torch_model, *x, added, conditioning_scale=scale, guess_mode=guess_mode))
    assert len(errors) == 5 and max(errors) <= TOL, errors


def test_options(tmp_path):
    """BGR order, global pooling (guess mode then scales nothing, as in diffusers),
    the resnet-only mid block, scale-shift time embedding, two channels."""
    torch_model = reference(OPTIONS, tmp_path)
    model = ControlNetModel.from_pretrained(tmp_path)
    x = inputs(model, seed=2)
    for guess_mode in (False, True):
        ours = model(*x, conditioning_scale=0.7, guess_mode=guess_mode)
        assert all(r.shape[1:3] == (1, 1) for r in ours[0])
        errors = residual_errors(ours, torch_residuals(torch_model, *x, conditioning_scale=0.7, guess_mode=guess_mode))
        assert max(errors) <= TOL, errors


def test_bgr_flips_the_channels(sd15):
    """A ``bgr`` ControlNet reading a BGR image equals the ``rgb`` one reading it as RGB."""
    _, _, model = sd15
    bgr = nnx.clone(model)
    bgr.config = dataclasses.replace(model.config, controlnet_conditioning_channel_order="bgr")
    sample, t, context, image = inputs(model)
    rgb_down, rgb_mid = model(sample, t, context, image)
    bgr_down, bgr_mid = bgr(sample, t, context, image[..., ::-1])
    for ours, expected in zip(bgr_down + (bgr_mid,), rgb_down + (rgb_mid,)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    # ... and the flip is not a no-op on these weights (float32 noise is ~1e-7).
    embed = model.controlnet_cond_embedding
    assert rel_err(embed(image[..., ::-1]), embed(image)) > 1e-4


def test_scale_is_traced(sd15):
    """``conditioning_scale`` may be a traced array (so new values never
    recompile a jitted loop): scalar or one per sample, scaling linearly."""
    _, _, model = sd15
    graphdef, state = nnx.split(model)
    x = inputs(model)
    for scale in (np.float32(0.7), np.ones(B, np.float32)):   # traces (no Python use of the value)
        jax.jit(lambda s, scale, *x: nnx.merge(graphdef, s)(*x, conditioning_scale=scale, guess_mode=True)).lower(
            state, scale, *x)
    a, b = (model(*x, conditioning_scale=jax.numpy.float32(s), guess_mode=True) for s in (0.7, 0.3))
    for ra, rb in zip(a[0] + (a[1],), b[0] + (b[1],)):
        assert rel_err(np.asarray(rb) * 0.7, np.asarray(ra) * 0.3) <= 1e-6
    per_sample = model(*x, conditioning_scale=np.array([0.7, 0.3], np.float32), guess_mode=True)
    for rp, ra, rb in zip(per_sample[0] + (per_sample[1],), a[0] + (a[1],), b[0] + (b[1],)):
        assert rel_err(rp[0], ra[0]) <= 1e-6 and rel_err(rp[1], rb[1]) <= 1e-6


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """A diffusers UNet whose encoder matches SD15, and ours loaded from it."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("unet")
    torch_unet = TorchUNet(**SD15, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    torch_unet.save_pretrained(folder)
    return torch_unet, UNet2DConditionModel.from_pretrained(folder)


def test_residuals_through_the_unet(sd15, unets):
    """Our ControlNet's residuals into our UNet against diffusers' into diffusers'."""
    torch_model, _, model = sd15
    torch_unet, unet = unets
    sample, t, context, image = x = inputs(model, seed=3)
    down, mid = model(*x, conditioning_scale=0.8)
    ours = unet(sample, t, UNetConditioning(context, down_block_residuals=down, mid_block_residual=mid))
    with torch.no_grad():
        t_down, t_mid = torch_model(nchw(sample), torch.as_tensor(t), torch.from_numpy(context), nchw(image),
                                    conditioning_scale=0.8, return_dict=False)
        expected = torch_unet(nchw(sample), torch.as_tensor(t), torch.from_numpy(context),
                              down_block_additional_residuals=t_down, mid_block_additional_residual=t_mid).sample
    err = rel_err(ours, nhwc(expected))
    assert err <= TOL, err
    # The residuals change the prediction well beyond the bound (the test can fail).
    assert rel_err(unet(sample, t, context), nhwc(expected)) > 100 * TOL


def test_from_unet(unets):
    """As diffusers' ``from_unet``: same parameters; encoder copied; zero convs zero."""
    from diffusers import ControlNetModel as TorchControlNet

    torch_unet, unet = unets
    model = ControlNetModel.from_unet(unet)
    ours = module_state_dict(model)
    theirs = {k: v.numpy() for k, v in TorchControlNet.from_unet(torch_unet).state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    unet_state = module_state_dict(unet)
    for key, value in ours.items():
        if key.startswith(("conv_in", "time_embedding", "down_blocks", "mid_block")):
            np.testing.assert_array_equal(value, unet_state[key], err_msg=key)
            np.testing.assert_array_equal(value, theirs[key], err_msg=key)
        elif key.startswith(ZERO_CONVS):
            assert not value.any(), key
        else:   # the rest of the conditioning embedding: torch's default conv init
            bound = 1 / np.sqrt(np.prod(ours[key.replace(".bias", ".weight")].shape[1:]))
            assert value.std() > bound / 4 and np.abs(value).max() <= bound, key
    assert {k for k in TorchControlNet.from_config(model.config_dict).state_dict()} == set(ours)
    down, mid = model(*inputs(model))
    assert not any(np.asarray(r).any() for r in down) and not np.asarray(mid).any()


# --------------------------------------------------------------------------- folders

def test_folder_round_trip(sd15, tmp_path):
    from diffusers import ControlNetModel as TorchControlNet

    torch_model, folder, model = sd15
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / WEIGHTS)) == set(load_file(folder / WEIGHTS))
    for key, value in load_file(tmp_path / WEIGHTS).items():
        np.testing.assert_array_equal(value, load_file(folder / WEIGHTS)[key], err_msg=key)
    reloaded = TorchControlNet.from_pretrained(tmp_path).eval()
    x = inputs(model)
    assert residual_errors(torch_residuals(reloaded, *x), torch_residuals(torch_model, *x)) == [0.0] * 7


def test_fp16_variant(sd15, tmp_path):
    torch_model, _, _ = sd15
    copy.deepcopy(torch_model).half().save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_controlnet(tmp_path)
    model = load_controlnet(tmp_path, variant="fp16")
    expected = {k: v.half().float().numpy() for k, v in torch_model.state_dict().items()}
    loaded = module_state_dict(model)
    assert set(loaded) == set(expected)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


# --------------------------------------------------------------------------- single files

def original_file(torch_model, path, prefix="control_model.", extra=None):
    state = controlnet_to_original({k: v.numpy() for k, v in torch_model.state_dict().items()}, prefix=prefix)
    state.update(extra or {})
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return state


def assert_same_weights(model, torch_model):
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    loaded = module_state_dict(model)
    assert set(loaded) == set(expected)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_single_file_matches_diffusers_conversion(sd15, tmp_path):
    """The original layout written by our map, read by us and by diffusers'
    ``from_single_file`` (offline, config from the folder): the same weights."""
    from diffusers import ControlNetModel as TorchControlNet

    torch_model, folder, _ = sd15
    path = tmp_path / "control_sd15_small.safetensors"
    state = original_file(torch_model, path)
    assert "control_model.input_hint_block.14.weight" in state and "control_model.zero_convs.5.0.bias" in state
    assert {"control_model.input_blocks.3.0.op.weight", "control_model.middle_block.2.out_layers.3.bias"} <= set(state)
    assert_same_weights(load_controlnet(path, config=folder), torch_model)
    theirs = TorchControlNet.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_weights(load_controlnet(path, config=folder), theirs)


@pytest.mark.parametrize("suffix, prefix", [(".pth", "control_model."), (".safetensors", "")])
def test_single_file_forms(sd15, tmp_path, suffix, prefix):
    """``.pth`` (torch.load with weights_only) inside a full training checkpoint
    (the SD model's parts are skipped), and bare LDM keys without the prefix."""
    torch_model, folder, _ = sd15
    extra = {"model.diffusion_model.out.2.bias": np.zeros(4, np.float32), "betas": np.ones(3, np.float32)} \
        if prefix else None
    path = tmp_path / f"control{suffix}"
    original_file(torch_model, path, prefix=prefix, extra=extra)
    assert_same_weights(load_controlnet(path, config=str(folder / "config.json")), torch_model)


def test_single_file_with_diffusers_names(sd15, tmp_path):
    torch_model, folder, model = sd15
    path = tmp_path / "controlnet.safetensors"
    save_file(module_state_dict(model), path)
    assert_same_weights(load_controlnet(path, config=folder), torch_model)


def test_sdxl_single_file(sdxl, tmp_path):
    """SDXL original layout (``label_emb``, a two-level hint embedding) read back
    exactly. (diffusers' ``convert_controlnet_checkpoint`` drops ``label_emb`` and
    assumes four hint levels, so it is no reference here.)"""
    torch_model, folder, model = sdxl
    path = tmp_path / "control_sdxl.safetensors"
    state = original_file(torch_model, path)
    assert {"control_model.label_emb.0.0.weight", "control_model.input_hint_block.6.bias"} <= set(state)
    loaded = load_controlnet(path, config=folder)
    assert_same_weights(loaded, torch_model)
    assert loaded.config == model.config
    with pytest.raises(Incompatible, match="SDXL.*config="):
        load_controlnet(path)


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def original_state(sd15):
    return controlnet_to_original({k: v.numpy() for k, v in sd15[0].state_dict().items()})


def test_unknown_key(sd15, original_state, tmp_path):
    path = tmp_path / "unknown.safetensors"
    save_file(dict(original_state, **{"control_model.zero_convs.99.0.weight": np.zeros(1, np.float32)}), path)
    with pytest.raises(CheckpointError, match=r"unknown.safetensors.*control_model\.zero_convs\.99\.0\.weight"):
        load_controlnet(path, config=sd15[1])
    save_file(dict(original_state, stray=np.zeros(1, np.float32)), path)
    with pytest.raises(CheckpointError, match="neither ControlNet weights.*stray"):
        load_controlnet(path, config=sd15[1])


def test_missing_key(sd15, original_state, tmp_path):
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in original_state.items() if k != "control_model.middle_block_out.0.bias"}, path)
    with pytest.raises(CheckpointError, match=r"missing: control_model\.middle_block_out\.0\.bias "
                                              r"\(controlnet_mid_block\.bias\)"):
        load_controlnet(path, config=sd15[1])


def test_built_in_sd15_config_is_full_size():
    """The built-in config of single files builds lllyasviel's SD 1.5 ControlNet:
    diffusers' parameter names and shapes (abstractly: no weights), 361M
    parameters, 12 zero convs, the hint convs at input_hint_block.{0, 2, ..., 14}."""
    from diffusers import ControlNetModel as TorchControlNet

    ours = parameter_shapes(ControlNetModel.parse_config(SD15_CONTROLNET_CONFIG))
    with torch.device("meta"):
        reference_model = TorchControlNet.from_config(SD15_CONTROLNET_CONFIG)
    theirs = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == 361_279_120
    names = {original_key(k, layers_per_block=2, hint_blocks=6) for k in ours}
    assert {f"zero_convs.{i}.0.weight" for i in range(12)} <= names and "zero_convs.12.0.weight" not in names
    assert {f"input_hint_block.{i}.weight" for i in range(0, 16, 2)} <= names


def test_default_config_does_not_fit(original_state, tmp_path):
    """A small file read with the built-in SD 1.5 config: the error names keys and says to pass config=."""
    path = tmp_path / "small.safetensors"
    save_file(original_state, path)
    with pytest.raises(CheckpointError, match="small.safetensors.*config="):
        load_controlnet(path)


def test_pickled_code_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"control_model.time_embed.0.weight": torch.zeros(1), "hook": copy.deepcopy}, path)
    with pytest.raises(CheckpointError, match="evil.pth.*weights-only"):
        load_controlnet(path)


def test_not_a_controlnet(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.2.bias": np.zeros(4, np.float32)}, path)
    with pytest.raises(CheckpointError, match="not a ControlNet file"):
        load_controlnet(path)


def test_added_cond_errors(sdxl, sd15):
    _, _, model = sdxl
    x = inputs(model)
    with pytest.raises(BadArgument, match="text_time.*added_cond="):
        model(*x)
    sd15_sized = {"text_embeds": np.zeros((B, 768), np.float32), "time_ids": np.zeros((B, 6), np.float32)}
    with pytest.raises(BadArgument, match="ControlNet's projection_class_embeddings_input_dim is 88"):
        model(*x, added_cond=sd15_sized)
    with pytest.raises(BadArgument, match="missing \\['time_ids'\\]"):
        model(*x, added_cond={"text_embeds": sd15_sized["text_embeds"]})
    with pytest.raises(BadArgument, match="ControlNet has no added conditioning"):
        sd15[2](*inputs(sd15[2]), added_cond=sdxl_added())


def test_input_shape_errors(sd15):
    _, _, model = sd15
    sample, t, context, image = inputs(model)
    with pytest.raises(BadArgument, match=r"controlnet_cond is 24x40 pixels.*latents are 6x10.*\(48x80\)"):
        model(sample, t, context, image[:, ::2, ::2])
    with pytest.raises(BadArgument, match="controlnet_cond must be .*, 3\\]"):
        model(sample, t, context, image[..., :1])
    with pytest.raises(BadArgument, match="encoder_hidden_states must be .*32"):
        model(sample, t, context[..., :16], image)
    with pytest.raises(BadArgument, match="conditioning_scale must be"):
        model(sample, t, context, image, conditioning_scale=np.ones(3, np.float32))


def test_config_errors(sd15, tmp_path):
    config = sd15[2].config_dict
    with pytest.raises(Unsupported, match="controlnet_conditioning_channel_order='gbr'"):
        ControlNetModel.parse_config(dict(config, controlnet_conditioning_channel_order="gbr"))
    with pytest.raises(Unsupported, match="mid_block_type=None"):
        ControlNetModel.parse_config(dict(config, mid_block_type=None))
    with pytest.raises(ValueError, match="layers_per_block must be a positive integer"):
        ControlNetModel.parse_config(dict(config, layers_per_block=[1, 2]))
