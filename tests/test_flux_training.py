"""Training a FLUX IP-Adapter: one rectified-flow step against a PyTorch
reference (diffusers' FLUX transformer with its IP-Adapter processors, the
same draws), loss <= 1e-5 relative and gradients <= 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flux_fixtures as ff
from helpers import rel_err


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_train")
    ff.build_flux_folder(root, guidance=True)
    return root


def test_one_step_matches_pytorch(root):
    import jax
    from diffusers import FluxTransformer2DModel as TorchFlux
    from flax import nnx

    from ipadapter_jax.io.params import module_state_dict
    from ipadapter_jax.ip_adapter.flux import flux_ip_adapter_state_dict, new_flux_ip_adapter
    from ipadapter_jax.models.flux import FluxTransformer2DModel
    from ipadapter_jax.pipeline.flux import latent_image_ids
    from ipadapter_jax.training.flux_step import ADAPTER, FlowStepConfig, FluxTrainModels, draw, flow_loss

    transformer = FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer")
    adapter = new_flux_ip_adapter(transformer, ff.IMAGE_EMBED, num_tokens=4, rngs=nnx.Rngs(3))
    # A fresh adapter's k/v start from the init; give every weight a random value so each gradient is exercised.
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):
        var.set_value(jax.numpy.asarray(rng.standard_normal(var.get_value().shape).astype(np.float32) * 0.1))
    models = FluxTrainModels(transformer, adapter)
    graphdef, trainable, frozen = nnx.split(models, ADAPTER, ...)

    b, lat, text = 3, 8, 6
    batch = {"latents": rng.standard_normal((b, (lat // 2) ** 2, 16)).astype(np.float32),
             "context": rng.standard_normal((b, text, ff.TOKEN_DIM)).astype(np.float32),
             "pooled": rng.standard_normal((b, 32)).astype(np.float32),
             "empty_context": rng.standard_normal((1, text, ff.TOKEN_DIM)).astype(np.float32),
             "empty_pooled": rng.standard_normal((1, 32)).astype(np.float32),
             "image_embeds": rng.standard_normal((b, ff.IMAGE_EMBED)).astype(np.float32)}
    cfg = FlowStepConfig(image_drop_rate=0.3, text_drop_rate=0.3, both_drop_rate=0.0, guidance=3.5)
    draws = jax.tree.map(np.asarray, draw(jax.random.key(11), b, batch["latents"].shape, cfg))
    draws["keep_image"] = np.asarray([1.0, 0.0, 1.0], np.float32)    # one sample of each kind, whatever the draw
    draws["keep_text"] = np.asarray([1.0, 1.0, 0.0], np.float32)
    txt_ids, img_ids = np.zeros((text, 3), np.float32), latent_image_ids(lat, lat)
    rope = transformer.rope(txt_ids, img_ids)

    loss, grads = jax.value_and_grad(
        lambda p: flow_loss(nnx.merge(graphdef, p, frozen), batch, draws, rope, cfg))(trainable)
    mine = module_state_dict(nnx.merge(nnx.graphdef(adapter), grads["adapter"]))

    # The reference: diffusers' transformer with the same adapter weights as IP processors.
    ref = TorchFlux.from_pretrained(root / "flux-dev" / "transformer")
    state = {k: torch.from_numpy(v) for k, v in flux_ip_adapter_state_dict(adapter).items()}
    ref._load_ip_adapter_weights([{
        "image_proj": {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("ip_adapter_proj_model.")},
        "ip_adapter": {k.split(".", 1)[1].replace("processor.", "").replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                       .replace("ip_adapter_double_stream_v_proj", "to_v_ip"): v
                       for k, v in state.items() if k.startswith("double_blocks.")}}])
    ref.requires_grad_(False)
    params = {}
    proj = ref.encoder_hid_proj.image_projection_layers[0]
    params["image_proj.proj.weight"], params["image_proj.proj.bias"] = proj.image_embeds.weight, proj.image_embeds.bias
    params["image_proj.norm.weight"], params["image_proj.norm.bias"] = proj.norm.weight, proj.norm.bias
    for i, block in enumerate(ref.transformer_blocks):
        proc = block.attn.processor
        for kv, layer in (("k", proc.to_k_ip[0]), ("v", proc.to_v_ip[0])):
            params[f"layers.{i}.to_{kv}_ip.weight"], params[f"layers.{i}.to_{kv}_ip.bias"] = layer.weight, layer.bias
    for p in params.values():
        p.requires_grad_(True)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in {**batch, **draws}.items()}
    x0 = t["latents"]
    sigma = t["sigma"][:, None, None]
    noisy = (1 - sigma) * x0 + sigma * t["noise"]
    context = torch.where(t["keep_text"][:, None, None] > 0, t["context"], t["empty_context"])
    pooled = torch.where(t["keep_text"][:, None] > 0, t["pooled"], t["empty_pooled"])
    embeds = (t["image_embeds"] * t["keep_image"][:, None])[:, None]
    pred = ref(hidden_states=noisy, encoder_hidden_states=context, pooled_projections=pooled, timestep=t["sigma"],
               img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
               guidance=torch.full((b,), 3.5), joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]},
               return_dict=False)[0]
    ref_loss = torch.nn.functional.mse_loss(pred, t["noise"] - x0)
    ref_loss.backward()

    assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) <= 1e-5
    assert sorted(mine) == sorted(params)
    for key, p in params.items():
        if key.endswith("to_k_ip.bias"):
            # Zero in exact arithmetic (a key bias adds q.b to every logit of a query: softmax ignores it); both
            # sides give rounding noise, which must stay negligible next to the key weights' gradient.
            scale = np.linalg.norm(params[key.replace("bias", "weight")].grad.numpy())
            assert np.linalg.norm(mine[key]) <= 1e-6 * scale and np.linalg.norm(p.grad.numpy()) <= 1e-6 * scale
            continue
        assert rel_err(mine[key], p.grad.numpy()) <= 1e-4, key


def test_sigmas_follow_the_configured_shift():
    import jax

    from ipadapter_jax.schedulers.flow_match import FlowMatchEuler
    from ipadapter_jax.training.flux_step import FlowStepConfig, shift_sigmas

    u = np.linspace(0.05, 0.95, 7).astype(np.float32)
    # The resolution shift is the sampling schedule's: at 4096 tokens, FLUX.1-dev's sigmas for the same u.
    sched = FlowMatchEuler({"use_dynamic_shifting": True})
    expected = sched.sigmas(len(u), 4096, sigmas=u)
    np.testing.assert_allclose(np.asarray(shift_sigmas(jax.numpy.asarray(u), FlowStepConfig(), 4096)), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(shift_sigmas(u, FlowStepConfig(shift=1.0), 4096)), u, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(shift_sigmas(u, FlowStepConfig(shift=3.0), 64)), 3 * u / (1 + 2 * u),
                               rtol=1e-6)


def test_train_py_trains_and_exports_an_adapter_diffusers_loads(root, tmp_path):
    """``train.py --config configs/flux_ip_adapter.py`` on a tiny FLUX folder: a few
    steps on json data, resumed from its checkpoint, and an XLabs-layout file that
    diffusers' FluxPipeline.load_ip_adapter reads (and this package samples with)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from helpers import cpu_env

    repo = Path(__file__).resolve().parents[1]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")
        records.append({"image_file": f"{i}.png", "text": ["a red cat", "a blue dog", "a photo", "grass"][i]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    encoder = ff.build_image_encoder(tmp_path)
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(repo / "train.py"), "--config", str(repo / "configs" / "flux_ip_adapter.py"),
           f"--config.workdir={workdir}", f"--config.model.pretrained={root / 'flux-dev'}",
           f"--config.model.image_encoder={encoder}", f"--config.data.json_file={tmp_path / 'data.json'}",
           f"--config.data.image_root={images}", "--config.data.resolution=32", "--config.data.batch_size=2",
           "--config.data.workers=0", "--config.flow.max_sequence_length=16", "--config.step.compute_dtype=float32",
           "--config.train.log_every=1", "--config.train.save_every=2", "--config.optimizer.lr=1e-3"]
    first = subprocess.run(cmd + ["--config.train.steps=2"], capture_output=True, text=True, env=cpu_env(),
                           timeout=600, cwd=repo)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd + ["--config.train.steps=3"], capture_output=True, text=True, env=cpu_env(),
                            timeout=600, cwd=repo)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "'resumed_from': 2" in second.stdout, second.stdout
    losses = [float(row.split(",")[1]) for row in (workdir / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and np.isfinite(losses).all()
    # Resumed exactly: the same batches, draws and updates as one uninterrupted run.
    whole = [c.replace(str(workdir), str(tmp_path / "whole")) for c in cmd] + ["--config.train.steps=3"]
    run = subprocess.run(whole, capture_output=True, text=True, env=cpu_env(), timeout=600, cwd=repo)
    assert run.returncode == 0, run.stderr[-3000:]
    uninterrupted = [float(r.split(",")[1]) for r in (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[1:]]
    assert losses == uninterrupted
    export = workdir / "ip_adapter.safetensors"

    from diffusers import FluxPipeline as TorchFlux

    pipe = TorchFlux.from_pretrained(root / "flux-dev")
    pipe.load_ip_adapter(str(workdir), weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=str(encoder), image_encoder_dtype=torch.float32)
    assert pipe.transformer.encoder_hid_proj.num_ip_adapters == 1
    from ipadapter_jax.ip_adapter.flux import load_flux_ip_adapter
    from ipadapter_jax.models.flux import FluxTransformer2DModel

    adapter = load_flux_ip_adapter(export, FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer"))
    assert adapter.num_tokens == 4


def test_remat_per_block_gives_the_same_gradients(root):
    """Gradient checkpointing per transformer block (``remat=True``): the same loss and adapter
    gradients as keeping every activation."""
    import jax
    from flax import nnx

    from ipadapter_jax.ip_adapter.flux import new_flux_ip_adapter
    from ipadapter_jax.models.flux import FluxTransformer2DModel
    from ipadapter_jax.pipeline.flux import latent_image_ids
    from ipadapter_jax.training.flux_step import ADAPTER, FlowStepConfig, FluxTrainModels, draw, flow_loss

    rng = np.random.default_rng(5)
    batch = {"latents": rng.standard_normal((2, 16, 16)).astype(np.float32),
             "context": rng.standard_normal((2, 4, ff.TOKEN_DIM)).astype(np.float32),
             "pooled": rng.standard_normal((2, 32)).astype(np.float32),
             "empty_context": np.zeros((1, 4, ff.TOKEN_DIM), np.float32),
             "empty_pooled": np.zeros((1, 32), np.float32),
             "image_embeds": rng.standard_normal((2, ff.IMAGE_EMBED)).astype(np.float32)}
    cfg = FlowStepConfig()
    draws = draw(jax.random.key(1), 2, batch["latents"].shape, cfg)
    results = []
    for remat in (False, True):
        transformer = FluxTransformer2DModel.from_pretrained(root / "flux-dev" / "transformer", remat=remat)
        adapter = new_flux_ip_adapter(transformer, ff.IMAGE_EMBED, rngs=nnx.Rngs(7))
        rope = transformer.rope(np.zeros((4, 3), np.float32), latent_image_ids(8, 8))
        graphdef, trainable, frozen = nnx.split(FluxTrainModels(transformer, adapter), ADAPTER, ...)
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: flow_loss(nnx.merge(graphdef, p, frozen), batch, draws, rope, cfg)))(trainable)
        results.append((float(loss), jax.tree.leaves(grads)))
    (loss0, g0), (loss1, g1) = results
    assert abs(loss0 - loss1) <= 1e-6 * abs(loss0)
    flat0, flat1 = (np.concatenate([np.ravel(np.asarray(g)) for g in gs]) for gs in (g0, g1))
    assert rel_err(flat1, flat0) <= 1e-6
    biggest = max(np.linalg.norm(np.asarray(a)) for a in g0)
    for a, b in zip(g0, g1):
        # The image keys' biases have a zero gradient by math (softmax ignores a shift shared by all
        # logits): rounding noise there has no relative size to compare.
        if np.linalg.norm(np.asarray(a)) > 1e-4 * biggest:
            assert rel_err(np.asarray(b), np.asarray(a)) <= 1e-6
