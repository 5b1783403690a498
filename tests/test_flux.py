"""FLUX.1 against diffusers / transformers (float32, CPU): the transformer with
and without XLabs IP-Adapters, the T5 encoder, the flow-matching schedule,
the latent packing, and whole sampling runs (dev with embedded guidance,
true CFG, v1 and v2 adapters; schnell) on tiny random folders saved with
diffusers' ``save_pretrained``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flux_fixtures as ff
from helpers import rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    ff.build_flux_folder(root, guidance=True)
    ff.build_flux_folder(root, guidance=False, seed=1)
    ff.build_image_encoder(root)
    ff.write_xlabs(root / "ip_adapter_v1.safetensors", 4, seed=2)
    ff.write_xlabs(root / "ip_adapter_v2.safetensors", 16, seed=3)
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "ref.png")
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / "ref2.png")
    return root


@pytest.fixture(scope="module")
def dev(root):
    from ipadapter_jax.pipeline.flux import FluxPipeline

    return FluxPipeline.from_pretrained(root / "flux-dev", image_encoder=root / "image_encoder")


def _torch_transformer(folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()


def _diffusers_ip_state(state: dict) -> dict:
    """XLabs keys -> the {"image_proj", "ip_adapter"} dicts diffusers' loader builds."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        t = torch.from_numpy(value)
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj"][key.split(".", 1)[1]] = t
        else:
            name = (key.split(".", 1)[1].replace("processor.", "").replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                    .replace("ip_adapter_double_stream_v_proj", "to_v_ip"))
            out["ip_adapter"][name] = t
    return out


@pytest.mark.parametrize("with_ip", [False, True])
def test_transformer_matches_diffusers(root, dev, with_ip):
    from ipadapter_jax.ip_adapter.flux import flux_image_prompt, flux_ip_adapter_from_state, _canonical
    from ipadapter_jax.pipeline.flux import latent_image_ids

    ref = _torch_transformer(root / "flux-dev")
    model = dev.transformer
    rng = np.random.default_rng(1)
    b, text, lat = 2, 7, 8
    x = rng.standard_normal((b, (lat // 2) ** 2, 16)).astype(np.float32)
    ctx = rng.standard_normal((b, text, ff.TOKEN_DIM)).astype(np.float32)
    pooled = rng.standard_normal((b, 32)).astype(np.float32)
    t = np.asarray([0.9, 0.31], np.float32)
    g = np.asarray([3.5, 2.0], np.float32)
    txt_ids = np.zeros((text, 3), np.float32)
    txt_ids[:, 1] = np.arange(text)       # non-zero text ids exercise all three RoPE axes
    img_ids = latent_image_ids(lat, lat)
    kwargs = {}
    ip = ()
    if with_ip:
        state = ff.xlabs_state(4, seed=5)
        ref._load_ip_adapter_weights([_diffusers_ip_state(state)])
        scales = [0.7, 1.3]
        for block, s in zip(ref.transformer_blocks, scales):
            block.attn.processor.scale = [s]
        embeds = rng.standard_normal((b, 2, ff.IMAGE_EMBED)).astype(np.float32)   # two reference images
        kwargs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [torch.from_numpy(embeds)]}
        adapter = flux_ip_adapter_from_state(_canonical(state, "test"), model, "test")
        tokens = np.stack([np.asarray(adapter.project(e)) for e in embeds])
        ip = ((adapter, flux_image_prompt(adapter, tokens, scales)),)
    with torch.no_grad():
        expected = ref(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                       pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                       img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
                       guidance=torch.from_numpy(g), return_dict=False, **kwargs)[0].numpy()
    out = model(x, ctx, pooled, t, model.rope(txt_ids, img_ids), g, ip=ip)
    assert rel_err(out, expected) <= 1e-5


def test_transformer_without_guidance_embedding_matches(root):
    from ipadapter_jax.models.flux import FluxTransformer2DModel
    from ipadapter_jax.pipeline.flux import latent_image_ids

    ref = _torch_transformer(root / "flux-schnell")
    model = FluxTransformer2DModel.from_pretrained(root / "flux-schnell" / "transformer")
    assert model.time_text_embed.guidance_embedder is None
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, ff.TOKEN_DIM)).astype(np.float32)
    pooled = rng.standard_normal((1, 32)).astype(np.float32)
    t = np.asarray([0.5], np.float32)
    txt, img = np.zeros((5, 3), np.float32), latent_image_ids(8, 8)
    with torch.no_grad():
        expected = ref(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                       pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                       img_ids=torch.from_numpy(img), txt_ids=torch.from_numpy(txt), return_dict=False)[0].numpy()
    assert rel_err(model(x, ctx, pooled, t, model.rope(txt, img)), expected) <= 1e-5


def test_t5_encoder_matches_transformers(root):
    from transformers import T5EncoderModel as TorchT5

    from ipadapter_jax.models.t5 import T5EncoderModel

    folder = root / "flux-dev" / "text_encoder_2"
    ref = TorchT5.from_pretrained(folder).eval()
    model = T5EncoderModel.from_pretrained(folder)
    ids = np.random.default_rng(3).integers(0, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(model(ids), expected) <= 1e-5


def test_relative_position_buckets_match_transformers():
    """Every bucket of a full-size T5 (32 buckets, distance 128) up to 512 tokens, boundaries included."""
    from transformers.models.t5.modeling_t5 import T5Attention

    from ipadapter_jax.models.t5 import relative_position_buckets

    n = 512
    relative = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    expected = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=32,
                                                     max_distance=128).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, 32, 128), expected)


@pytest.mark.parametrize("config", [ff.DEV_SCHEDULER, ff.SCHNELL_SCHEDULER])
def test_flow_match_schedule_matches_diffusers(config):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ipadapter_jax.schedulers.flow_match import FlowMatchEuler

    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowMatchEuler(dict(ref.config))
    for steps, seq in ((4, 64), (28, 4096), (50, 1024), (1, 256)):
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        state = ours.set_timesteps(steps, seq)
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
        np.testing.assert_array_equal(np.asarray(state.tables["sigmas"]), ref.sigmas.numpy())


def test_packing_matches_diffusers():
    from diffusers import FluxPipeline as TorchFlux

    from ipadapter_jax.pipeline.flux import latent_image_ids, pack_latents, unpack_latents

    x = np.random.default_rng(4).standard_normal((2, 8, 12, 16)).astype(np.float32)
    packed = TorchFlux._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 2, 16, 8, 12).numpy()
    np.testing.assert_array_equal(np.asarray(pack_latents(x)), packed)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 8, 12)), x)
    ids = TorchFlux._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(8, 12), ids)


def _reference_run(root, folder: str, *, adapter: str | None, **call):
    from diffusers import FluxPipeline as TorchFlux

    pipe = TorchFlux.from_pretrained(root / folder)
    if adapter is not None:
        pipe.load_ip_adapter(str(root), weight_name=adapter,
                             image_encoder_pretrained_model_name_or_path=str(root / "image_encoder"),
                             image_encoder_dtype=torch.float32)   # diffusers' FLUX default is float16
    with torch.no_grad():
        return pipe(output_type="latent", return_dict=False, **call)[0].numpy()


def _noise(batch: int = 1):
    lh = ff.HEIGHT // 2
    return np.random.default_rng(7).standard_normal((batch, lh, lh, 4)).astype(np.float32)


CASES = {
    "v1": dict(adapter="ip_adapter_v1.safetensors", true_cfg=1.0),
    "v1-true-cfg": dict(adapter="ip_adapter_v1.safetensors", true_cfg=2.5),
    "v2-true-cfg": dict(adapter="ip_adapter_v2.safetensors", true_cfg=3.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_matches_diffusers(root, dev, case):
    from PIL import Image

    from ipadapter_jax.pipeline import ImagePromptSpec
    from ipadapter_jax.pipeline.flux import pack_latents

    adapter, true_cfg = CASES[case]["adapter"], CASES[case]["true_cfg"]
    noise = _noise()
    ref_image = Image.open(root / "ref.png")
    negative = "blue painting" if true_cfg > 1 else None
    expected = _reference_run(
        root, "flux-dev", adapter=adapter, prompt="a red cat sitting on grass", height=ff.HEIGHT, width=ff.WIDTH,
        num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=true_cfg, negative_prompt=negative,
        latents=torch.from_numpy(np.asarray(pack_latents(noise))), ip_adapter_image=ref_image,
        max_sequence_length=ff.MAX_SEQ)
    dev.detach_ip_adapters()
    dev.load_ip_adapter(root / adapter)
    out = dev("a red cat sitting on grass", negative_prompt=negative, true_cfg_scale=true_cfg,
              ip_adapter_prompts=[ImagePromptSpec(images=[ref_image])], num_inference_steps=3,
              guidance_scale=3.5, height=ff.HEIGHT, width=ff.WIDTH, latents=noise, max_sequence_length=ff.MAX_SEQ)
    assert out.latents.shape == (1, ff.HEIGHT // 2, ff.WIDTH // 2, 4)
    assert rel_err(np.asarray(pack_latents(out.latents)), expected) <= 1e-4
    assert out.images.shape == (1, ff.HEIGHT, ff.WIDTH, 3) and np.isfinite(out.images).all()


def test_schnell_sampling_matches_diffusers(root):
    from ipadapter_jax.pipeline.flux import FluxPipeline, pack_latents

    noise = _noise(2)
    expected = _reference_run(root, "flux-schnell", adapter=None, prompt=["a dog", "a photo of a cat"],
                              height=ff.HEIGHT, width=ff.WIDTH, num_inference_steps=2, guidance_scale=0.0,
                              latents=torch.from_numpy(np.asarray(pack_latents(noise))),
                              max_sequence_length=ff.MAX_SEQ)
    pipe = FluxPipeline.from_pretrained(root / "flux-schnell")
    out = pipe(["a dog", "a photo of a cat"], num_inference_steps=2, height=ff.HEIGHT, width=ff.WIDTH,
               latents=noise, max_sequence_length=ff.MAX_SEQ)
    assert rel_err(np.asarray(pack_latents(out.latents)), expected) <= 1e-4


def test_adapter_file_round_trip_and_family_errors(root, dev, tmp_path):
    from ipadapter_jax.io.errors import Incompatible
    from ipadapter_jax.ip_adapter.flux import load_flux_ip_adapter, save_flux_ip_adapter
    from safetensors.numpy import load_file, save_file

    adapter = load_flux_ip_adapter(root / "ip_adapter_v2.safetensors", dev.transformer)
    assert adapter.num_tokens == 16 and adapter.num_layers == 2
    out = save_flux_ip_adapter(adapter, tmp_path / "copy.safetensors")
    original, copy = load_file(root / "ip_adapter_v2.safetensors"), load_file(out)
    assert sorted(original) == sorted(copy)
    for key in original:
        np.testing.assert_array_equal(original[key], copy[key])
    # An SD (h94) adapter on FLUX is one error naming both families.
    sd = {"image_proj.proj.weight": np.zeros((4 * 768, 1024), np.float32),
          "ip_adapter.1.to_k_ip.weight": np.zeros((320, 768), np.float32)}
    save_file(sd, tmp_path / "ip-adapter_sd15.safetensors")
    with pytest.raises(Incompatible, match="Stable Diffusion IP-Adapter.*FLUX"):
        dev.load_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors")


# --------------------------------------------------------------------------- the command line

def _sample(argv, capsys) -> tuple[int, str]:
    from ipadapter_jax.cli import sample

    try:
        rc = sample.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_error_line(rc: int, err: str) -> str:
    assert rc == 2 and "Traceback" not in err, (rc, err[-3000:])
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def test_sample_command_runs_flux(root, dev, tmp_path, capsys):
    """``ipadapter-sample --model FLUX_FOLDER`` with an XLabs adapter, true CFG and a
    negative image: the latents it saves are the pipeline's for the same call."""
    from ipadapter_jax.pipeline import ImagePromptSpec

    out, saved = tmp_path / "flux.png", tmp_path / "final.npy"
    rc, err = _sample(["--model", root / "flux-dev", "--image-encoder", root / "image_encoder",
                       "--ip-adapter", root / "ip_adapter_v1.safetensors", "--image", root / "ref.png",
                       "--negative-image", root / "ref2.png", "--prompt", "a cat", "--negative-prompt", "a dog",
                       "--true-cfg", 2.0, "--scale", 0.8, "--steps", 2, "--height", ff.HEIGHT, "--width", ff.WIDTH,
                       "--max-sequence-length", ff.MAX_SEQ, "--seed", 3, "--no-progress", "--cache-dir", "",
                       "--out", out, "--save-latents", saved], capsys)
    assert rc == 0, err[-3000:]
    assert out.is_file()
    dev.detach_ip_adapters()
    dev.load_ip_adapter(root / "ip_adapter_v1.safetensors")
    expected = dev("a cat", negative_prompt="a dog", true_cfg_scale=2.0, num_inference_steps=2, height=ff.HEIGHT,
                   width=ff.WIDTH, max_sequence_length=ff.MAX_SEQ, seed=3,
                   ip_adapter_prompts=[ImagePromptSpec(images=[root / "ref.png"], scale=0.8,
                                                       negative_images=[root / "ref2.png"])])
    np.testing.assert_allclose(np.load(saved), expected.latents, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["sd-adapter-on-flux", "flux-adapter-on-sd", "sd-flag-on-flux",
                                  "flux-flag-on-sd", "size-not-16", "negative-without-true-cfg",
                                  "sequence-too-long", "fsdp-zero"])
def test_sample_command_refuses_the_other_family(root, tmp_path, capsys, case):
    from safetensors.numpy import save_file

    import sd_fixtures

    sd_adapter = tmp_path / "ip-adapter_sd15.safetensors"
    save_file({"image_proj.proj.weight": np.zeros((8, 4), np.float32),
               "ip_adapter.1.to_k_ip.weight": np.zeros((4, 4), np.float32)}, sd_adapter)
    flux = ["--model", root / "flux-dev", "--image-encoder", root / "image_encoder", "--image", root / "ref.png"]
    if case.endswith("on-sd"):
        sd = tmp_path / "sd"
        sd_fixtures.build_pipeline_folder(sd)
        base = ["--model", sd / "sd", "--image-encoder", sd / "image_encoder", "--image", root / "ref.png"]
    args, mentions = {
        "sd-adapter-on-flux": (flux + ["--ip-adapter", sd_adapter], ("Stable Diffusion IP-Adapter", "FLUX.1")),
        "flux-adapter-on-sd": (["--ip-adapter", root / "ip_adapter_v1.safetensors"], ("FLUX IP-Adapter", "SD 1.x")),
        "sd-flag-on-flux": (flux + ["--ip-adapter", root / "ip_adapter_v1.safetensors", "--scheduler", "euler"],
                            ("--scheduler", "Stable Diffusion (UNet) models only", "FLUX.1")),
        "flux-flag-on-sd": (["--ip-adapter", sd_adapter, "--true-cfg", 2], ("--true-cfg", "FLUX models only")),
        "size-not-16": (flux + ["--ip-adapter", root / "ip_adapter_v1.safetensors", "--height", 40],
                        ("--height", "multiple of 16")),
        "sequence-too-long": (flux + ["--ip-adapter", root / "ip_adapter_v1.safetensors",
                                      "--max-sequence-length", 600], ("--max-sequence-length", "512")),
        "fsdp-zero": (flux + ["--ip-adapter", root / "ip_adapter_v1.safetensors", "--fsdp", 0],
                      ("--fsdp", "at least 1")),
        "negative-without-true-cfg": (flux + ["--ip-adapter", root / "ip_adapter_v1.safetensors",
                                              "--negative-prompt", "blurry"], ("--negative-prompt", "--true-cfg")),
    }[case]
    if case.endswith("on-sd"):
        args = base + args
    line = _one_error_line(*_sample([*args, "--no-progress", "--cache-dir", "", "--out", tmp_path / "x.png"], capsys))
    for mention in mentions:
        assert mention in line, (mention, line)
    assert not (tmp_path / "x.png").exists()


FSDP_SCRIPT = """
import sys, numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
from ipadapter_jax.pipeline import ImagePromptSpec
from ipadapter_jax.pipeline.flux import FluxPipeline
root, out = sys.argv[1], sys.argv[2]
assert len(jax.devices()) == 8
results = {}
for fsdp in (8, 4):
    pipe = FluxPipeline.from_pretrained(root + "/flux-dev", image_encoder=root + "/image_encoder", fsdp=fsdp)
    pipe.load_ip_adapter(root + "/ip_adapter_v1.safetensors")
    r = pipe(["a cat", "a dog"], ip_adapter_prompts=[ImagePromptSpec(images=[root + "/ref.png"])],
             num_inference_steps=2, height=32, width=32, max_sequence_length=16, seed=5,
             progress=fsdp == 4)     # step by step (the command line's progress bar) on a sharded mesh too
    kernel = pipe.transformer.context_embedder.kernel[...]     # 4096 x 32: big enough to split
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.size * fsdp == kernel.size
    results[f"fsdp{fsdp}"] = r.latents
np.savez(out, **results)
"""


def test_fsdp_sampling_equals_one_device(root, dev, tmp_path):
    """8 CPU devices: the transformer's weights split 8 ways (and 4 ways x 2 batch
    shards) give the 1-device run's latents."""
    import subprocess
    import sys

    from helpers import cpu_env
    from ipadapter_jax.pipeline import ImagePromptSpec

    out = tmp_path / "fsdp.npz"
    run = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(root), str(out)], env=cpu_env(8),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    dev.detach_ip_adapters()
    dev.load_ip_adapter(root / "ip_adapter_v1.safetensors")
    one = dev(["a cat", "a dog"], ip_adapter_prompts=[ImagePromptSpec(images=[root / "ref.png"])],
              num_inference_steps=2, height=32, width=32, max_sequence_length=16, seed=5).latents
    for name, latents in np.load(out).items():
        assert rel_err(latents, one) <= 1e-5, name


# --------------------------------------------------------------------------- BFL single files

def to_bfl(state: dict, prefix: str = "") -> dict:
    """diffusers' FLUX transformer names -> BFL's single-file names (the inverse map, written here)."""
    plain = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
              "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
    norms = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
             "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
             "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
    out = {}
    for name, bfl in plain.items():
        for leaf in ("weight", "bias"):
            if f"{name}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = state[f"{name}.{leaf}"]
    for leaf in ("weight", "bias"):
        scale, shift = np.split(state[f"norm_out.linear.{leaf}"], 2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = np.concatenate([shift, scale])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for name, bfl in double.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{bfl}.{leaf}"] = state[f"{src}{name}.{leaf}"]
        for name, bfl in norms.items():
            out[dst + bfl] = state[src + name]
        for leaf in ("weight", "bias"):
            out[f"{dst}img_attn.qkv.{leaf}"] = np.concatenate([state[f"{src}attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{dst}txt_attn.qkv.{leaf}"] = np.concatenate([state[f"{src}attn.add_{x}_proj.{leaf}"] for x in "qkv"])
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in singles:
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}modulation.lin.{leaf}"] = state[f"{src}norm.linear.{leaf}"]
            out[f"{dst}linear2.{leaf}"] = state[f"{src}proj_out.{leaf}"]
            out[f"{dst}linear1.{leaf}"] = np.concatenate([state[f"{src}attn.to_{x}.{leaf}"] for x in "qkv"]
                                                         + [state[f"{src}proj_mlp.{leaf}"]])
        out[f"{dst}norm.query_norm.scale"] = state[f"{src}attn.norm_q.weight"]
        out[f"{dst}norm.key_norm.scale"] = state[f"{src}attn.norm_k.weight"]
    assert len(out) == len(state) - 8 * len(blocks) - 6 * len(singles)   # fused: 12 -> 4 and 8 -> 2 per block
    return {prefix + k: v for k, v in out.items()}


@pytest.mark.parametrize("storage", ["float32", "bfloat16-comfy"])
def test_bfl_single_file_reads_the_folders_weights(root, dev, tmp_path, storage):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from ipadapter_jax.convert.flux_single_file import load_bfl_transformer
    from ipadapter_jax.io.params import module_state_dict

    state = load_file(root / "flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors")
    path = tmp_path / "flux1-dev.safetensors"
    if storage == "float32":
        save_file(to_bfl(state), path)
        expected = state
    else:   # bf16 storage, under ComfyUI's prefix (the raw bytes: numpy's safetensors writer has no bfloat16)
        bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in to_bfl(state, "model.diffusion_model.").items()}
        _save_bf16(bf16, path)
        expected = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in state.items()}
    model = load_bfl_transformer(path, {"axes_dims_rope": [4, 6, 6]})
    assert model.config.guidance_embeds and model.config.num_layers == 2
    got = module_state_dict(model)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _save_bf16(tensors: dict, path) -> None:
    import json
    import struct

    header, blobs, offset = {}, [], 0
    for key, value in tensors.items():
        data = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_pipeline_from_a_bfl_single_file_samples_as_the_folder(root, dev, tmp_path, capsys):
    """``--model flux1-dev.safetensors --model-config FOLDER --vae FILE``: the folder's sampling, to the bit."""
    from safetensors.numpy import load_file, save_file

    from ipadapter_jax.pipeline.flux import FluxPipeline

    state = load_file(root / "flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(to_bfl(state), tmp_path / "flux1-dev.safetensors")
    vae = tmp_path / "ae.safetensors"
    save_file(load_file(root / "flux-dev" / "vae" / "diffusion_pytorch_model.safetensors"), vae)
    pipe = FluxPipeline.from_single_file(tmp_path / "flux1-dev.safetensors", model_config=root / "flux-dev", vae=vae)
    call = dict(num_inference_steps=2, height=ff.HEIGHT, width=ff.WIDTH, max_sequence_length=ff.MAX_SEQ, seed=1)
    dev.detach_ip_adapters()
    np.testing.assert_array_equal(pipe("a cat", **call).images, dev("a cat", **call).images)
    # The command line reads it the same way; without --model-config it says what to give.
    out = tmp_path / "x.png"
    line = _one_error_line(*_sample(["--model", tmp_path / "flux1-dev.safetensors", "--no-progress",
                                     "--cache-dir", "", "--out", out], capsys))
    assert "--model-config" in line and "FLUX" in line, line
    rc, err = _sample(["--model", tmp_path / "flux1-dev.safetensors", "--model-config", root / "flux-dev",
                       "--vae", vae, "--prompt", "a cat", "--steps", 2, "--height", ff.HEIGHT, "--width", ff.WIDTH,
                       "--max-sequence-length", ff.MAX_SEQ, "--no-progress", "--cache-dir", "", "--out", out], capsys)
    assert rc == 0 and out.is_file(), err[-3000:]


def test_parity_toolkit_on_a_flux_folder(root, tmp_path, capsys):
    """``ipadapter-parity --model FLUX_FOLDER --ip-adapter XLABS``: every component, block and step within the
    suite's bounds, the blocks named as diffusers names them, in the report's JSON."""
    import json

    from ipadapter_jax.cli import parity

    out = tmp_path / "parity.json"
    rc = parity.main(["--model", str(root / "flux-dev"), "--ip-adapter", str(root / "ip_adapter_v1.safetensors"),
                      "--image-encoder", str(root / "image_encoder"), "--image", str(root / "ref.png"),
                      "--prompt", "a red cat", "--steps", "2", "--height", str(ff.HEIGHT), "--width", str(ff.WIDTH),
                      "--max-sequence-length", str(ff.MAX_SEQ), "--scale", "0.8", "--json", str(out),
                      "--dtype", "bfloat16", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err[-3000:]
    report = json.loads(out.read_text())
    text = json.dumps(report)
    for name in ("text_encoder_2 (T5)", "image_proj", "transformer_blocks.1", "single_transformer_blocks.1",
                 "vae (decode)", '"step": 2', '"image": {"rel"'):
        assert name in text, name
    assert report["dtype"] == "bfloat16" and report["float32"]["dtype"] == "float32"   # each against its bounds


def test_masks_weight_each_reference_over_the_image_tokens(root, dev):
    """XLabs adapter masks over the packed image tokens: an all-ones mask is the unmasked prompt, an
    all-zero mask is no image prompt (scale 0); a half mask lies between."""
    from ipadapter_jax.pipeline import ImagePromptSpec

    dev.detach_ip_adapters()
    dev.load_ip_adapter(root / "ip_adapter_v1.safetensors")
    call = dict(num_inference_steps=2, height=ff.HEIGHT, width=ff.WIDTH, max_sequence_length=ff.MAX_SEQ, seed=4)
    ref = root / "ref.png"

    def run(**spec):
        return dev("a cat", ip_adapter_prompts=[ImagePromptSpec(images=[ref], **spec)], **call).latents
    ones, zeros = np.ones((ff.HEIGHT, ff.WIDTH), np.float32), np.zeros((ff.HEIGHT, ff.WIDTH), np.float32)
    half = zeros.copy()
    half[:, : ff.WIDTH // 2] = 1
    plain, off = run(), run(scale=0.0)
    np.testing.assert_allclose(run(masks=[ones]), plain, atol=1e-5)
    np.testing.assert_allclose(run(masks=[zeros]), off, atol=1e-5)
    halfway = run(masks=[half])
    assert not np.allclose(halfway, plain, atol=1e-4) and not np.allclose(halfway, off, atol=1e-4)
