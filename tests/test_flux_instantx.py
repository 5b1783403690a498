"""InstantX's FLUX.1-dev IP-Adapter: the SigLIP vision tower against
transformers, and the adapter on a tiny random FLUX transformer against a
PyTorch reference written here from InstantX's published attention processor
(``IPAFluxAttnProcessor2_0``: in every block, the queries after their QK norm
and before RoPE attend RMS-normed image keys (``norm_added_k``; its value norm
is commented out there) and the projected values; the output, times the scale,
joins the attention output before its projection; in single-stream blocks
every token's). diffusers does not run this adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flux_fixtures as ff
from helpers import rel_err

SIGLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TOKENS, HIDDEN = 8, 48


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("instantx")
    ff.build_flux_folder(root, guidance=True)
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).save_pretrained(root / "siglip")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 37, 3), dtype=np.uint8)).save(root / "ref.png")
    d, inner = SIGLIP["hidden_size"], 32
    state = {"image_proj": {"proj.0.weight": rng.standard_normal((HIDDEN, d)) * 0.2, "proj.0.bias": rng.standard_normal(HIDDEN) * 0.1,
                            "proj.2.weight": rng.standard_normal((TOKENS * ff.TOKEN_DIM, HIDDEN)) * 0.2,
                            "proj.2.bias": rng.standard_normal(TOKENS * ff.TOKEN_DIM) * 0.1,
                            "norm.weight": 1 + rng.standard_normal(ff.TOKEN_DIM) * 0.1,
                            "norm.bias": rng.standard_normal(ff.TOKEN_DIM) * 0.1},
             "ip_adapter": {f"{i}.to_{kv}_ip.weight": rng.standard_normal((inner, ff.TOKEN_DIM)) * 0.05
                            for i in range(4) for kv in "kv"}}
    torch.save({part: {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in values.items()}
                for part, values in state.items()}, root / "ip-adapter.bin")
    return root


def test_siglip_matches_transformers(root):
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionModel as TorchSiglip

    from ipadapter_jax.io.images import preprocess_siglip
    from ipadapter_jax.models.siglip import SiglipVisionModel

    image = Image.open(root / "ref.png")
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    ref_pixels = processor(images=image, return_tensors="pt").pixel_values
    pixels = preprocess_siglip([image], 32)
    np.testing.assert_allclose(pixels, ref_pixels.numpy().transpose(0, 2, 3, 1), atol=1e-6)
    ref = TorchSiglip.from_pretrained(root / "siglip").eval()
    with torch.no_grad():
        expected = ref(ref_pixels)
    out = SiglipVisionModel.from_pretrained(root / "siglip")(pixels)
    assert rel_err(out.last_hidden_state, expected.last_hidden_state.numpy()) <= 1e-5
    assert rel_err(out.pooler_output, expected.pooler_output.numpy()) <= 1e-5


class InstantXProcessor:
    """The reference: FLUX attention with InstantX's image branch (scale x Attn(q before RoPE,
    rms(to_k_ip(tokens)), to_v_ip(tokens)) added before the output projection)."""

    def __init__(self, to_k, to_v, tokens, scale):
        self.to_k, self.to_v, self.tokens, self.scale = to_k, to_v, tokens, scale

    @staticmethod
    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        b = hidden_states.shape[0]
        split = (lambda t: t.unflatten(-1, (attn.heads, -1)))
        q, k, v = attn.norm_q(split(attn.to_q(hidden_states))), attn.norm_k(split(attn.to_k(hidden_states))), \
            split(attn.to_v(hidden_states))
        ip_q = q
        if encoder_hidden_states is not None:
            cq = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            ck = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        q, k = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1), apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h.transpose(1, 2).flatten(2)
        ip_k = self.rms(self.to_k(self.tokens).view(b, -1, attn.heads, attn.head_dim)).transpose(1, 2)
        ip_v = self.to_v(self.tokens).view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)
        ip = F.scaled_dot_product_attention(ip_q.transpose(1, 2), ip_k, ip_v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return h + self.scale * ip
        text = encoder_hidden_states.shape[1]
        image = h[:, text:] + self.scale * ip
        return attn.to_out[0](image), attn.to_add_out(h[:, :text])


def test_instantx_adapter_matches_its_reference(root):
    from diffusers import FluxTransformer2DModel as TorchFlux

    from ipadapter_jax.ip_adapter.flux import INSTANTX, flux_image_prompt, load_flux_ip_adapter
    from ipadapter_jax.models.flux import FluxTransformer2DModel
    from ipadapter_jax.pipeline.flux import latent_image_ids

    model = FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer")
    adapter = load_flux_ip_adapter(root / "ip-adapter.bin", model)
    assert adapter.layout == INSTANTX and adapter.num_tokens == TOKENS and adapter.num_layers == 4
    rng = np.random.default_rng(3)
    b, text, lat = 2, 5, 8
    x = rng.standard_normal((b, (lat // 2) ** 2, 16)).astype(np.float32)
    ctx = rng.standard_normal((b, text, ff.TOKEN_DIM)).astype(np.float32)
    pooled = rng.standard_normal((b, 32)).astype(np.float32)
    t, g = np.asarray([0.8, 0.3], np.float32), np.asarray([3.5, 3.5], np.float32)
    embeds = rng.standard_normal((b, SIGLIP["hidden_size"])).astype(np.float32)
    scales = [0.6, 1.1, 0.9, 0.4]      # per block: 2 double-stream, then 2 single-stream
    tokens = np.asarray(adapter.project(embeds))[:, None]
    txt_ids, img_ids = np.zeros((text, 3), np.float32), latent_image_ids(lat, lat)
    out = model(x, ctx, pooled, t, model.rope(txt_ids, img_ids), g,
                ip=((adapter, flux_image_prompt(adapter, tokens, scales)),))

    ref = TorchFlux.from_pretrained(root / "flux-dev" / "transformer").eval()
    state = torch.load(root / "ip-adapter.bin", weights_only=True)
    proj = state["image_proj"]
    with torch.no_grad():
        h = F.linear(F.gelu(F.linear(torch.from_numpy(embeds), proj["proj.0.weight"], proj["proj.0.bias"])),
                     proj["proj.2.weight"], proj["proj.2.bias"]).reshape(b, TOKENS, ff.TOKEN_DIM)
        ref_tokens = F.layer_norm(h, (ff.TOKEN_DIM,), proj["norm.weight"], proj["norm.bias"])
        assert rel_err(tokens[:, 0], ref_tokens.numpy()) <= 1e-5
        blocks = list(ref.transformer_blocks) + list(ref.single_transformer_blocks)
        for i, block in enumerate(blocks):
            w = state["ip_adapter"]
            block.attn.set_processor(InstantXProcessor(lambda z, i=i: F.linear(z, w[f"{i}.to_k_ip.weight"]),
                                                       lambda z, i=i: F.linear(z, w[f"{i}.to_v_ip.weight"]),
                                                       ref_tokens, scales[i]))
        expected = ref(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                       pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                       img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
                       guidance=torch.from_numpy(g), return_dict=False)[0].numpy()
    assert rel_err(out, expected) <= 1e-5


def test_pipeline_samples_with_instantx_and_exports_its_layout(root, tmp_path):
    from ipadapter_jax.ip_adapter.flux import flux_ip_adapter_state_dict, save_flux_ip_adapter
    from ipadapter_jax.pipeline import ImagePromptSpec
    from ipadapter_jax.pipeline.flux import FluxPipeline

    pipe = FluxPipeline.from_pretrained(root / "flux-dev", image_encoder=root / "siglip")
    adapter = pipe.load_ip_adapter(root / "ip-adapter.bin")
    call = dict(num_inference_steps=2, height=ff.HEIGHT, width=ff.WIDTH, max_sequence_length=ff.MAX_SEQ, seed=2)
    with_image = pipe("a cat", ip_adapter_prompts=[ImagePromptSpec(images=[root / "ref.png"])], **call)
    without = pipe("a cat", ip_adapter_prompts=[ImagePromptSpec(images=[root / "ref.png"], scale=0.0)], **call)
    assert np.isfinite(with_image.latents).all() and not np.allclose(with_image.latents, without.latents)
    pipe.detach_ip_adapters()
    np.testing.assert_allclose(pipe("a cat", **call).latents, without.latents, atol=1e-6)   # scale 0 = no adapter
    state = torch.load(root / "ip-adapter.bin", weights_only=True)
    saved = flux_ip_adapter_state_dict(adapter)
    flat = {f"{part}.{k}": v.numpy() for part, values in state.items() for k, v in values.items()}
    assert sorted(saved) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(saved[key], value)
    save_flux_ip_adapter(adapter, tmp_path / "instantx.safetensors")


def test_train_py_trains_an_instantx_layout_adapter(root, tmp_path):
    """``configs/flux_ip_adapter_instantx.py``: SigLIP pixels and pooler_output, an MLP projection, every
    block; the export reads back as an InstantX adapter of this transformer."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from helpers import cpu_env
    from ipadapter_jax.ip_adapter.flux import INSTANTX, load_flux_ip_adapter
    from ipadapter_jax.models.flux import FluxTransformer2DModel

    repo = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "data.json").write_text(json.dumps([{"image_file": f"{i}.png", "text": "a cat"} for i in range(2)]))
    cmd = [sys.executable, str(repo / "train.py"), "--config", str(repo / "configs" / "flux_ip_adapter_instantx.py"),
           f"--config.workdir={tmp_path / 'run'}", f"--config.model.pretrained={root / 'flux-dev'}",
           f"--config.model.image_encoder={root / 'siglip'}", f"--config.data.json_file={tmp_path / 'data.json'}",
           f"--config.data.image_root={tmp_path / 'images'}", "--config.data.resolution=32",
           "--config.data.batch_size=2", "--config.data.workers=0", "--config.flow.max_sequence_length=16",
           "--config.step.compute_dtype=float32", "--config.model.num_tokens=8", "--config.train.steps=2",
           "--config.train.log_every=1", "--config.train.save_every=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=600, cwd=repo)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = load_flux_ip_adapter(tmp_path / "run" / "ip_adapter.safetensors",
                                   FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer"))
    assert adapter.layout == INSTANTX and adapter.num_tokens == 8 and adapter.num_layers == 4
