"""One training step against the PyTorch reference (diffusers UNet with
IP-Adapter processors, the official tutorial's loss): loss <= 1e-5, gradients
of every trainable tensor <= 1e-4, AdamW-updated parameters <= 1e-5."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

import ipadapter_fixtures as fx
from helpers import nchw, rel_err
from ipadapter_jax.ip_adapter import ip_adapter_state_dict, load_ip_adapter
from ipadapter_jax.models import UNet2DConditionModel
from ipadapter_jax.models.unet import remat_policy
from ipadapter_jax.training.step import StepConfig, Trainer
from sd_fixtures import SD15_SCHEDULER

B = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("train")
    tu = TorchUNet(**fx.UNET)
    tu.save_pretrained(folder / "unet")
    proj, ip = fx.image_proj("base", fx.UNET["cross_attention_dim"]), fx.ip_layers(tu)
    save_file(fx.flat(proj, ip), folder / "ip.safetensors")
    tu._load_ip_adapter_weights([fx.torch_nested(proj, ip)], low_cpu_mem_usage=False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    load_ip_adapter(folder / "ip.safetensors", unet)
    rng = np.random.default_rng(0)
    data = dict(latents=rng.standard_normal((B, 8, 8, 4), dtype=np.float32),
                text=rng.standard_normal((B, 5, fx.UNET["cross_attention_dim"]), dtype=np.float32),
                embeds=rng.standard_normal((B, fx.CLIP_DIM), dtype=np.float32),
                noise=rng.standard_normal((B, 8, 8, 4), dtype=np.float32), timesteps=np.array([17, 802]))
    data["embeds"][1] = 0.0   # sample 1's image dropped (the recipe zeroes its embedding)
    return tu, unet, data


def torch_trainable(tu) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors of the reference, by official key, the only ones that
    get gradients (cleared)."""
    proj = tu.encoder_hid_proj.image_projection_layers[0]
    out = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
           "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
    for p, processor in enumerate(tu.attn_processors.values()):
        if hasattr(processor, "to_k_ip"):
            out[f"ip_adapter.{p}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            out[f"ip_adapter.{p}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    for p in tu.parameters():      # gradients for these only, none left from before
        p.requires_grad_(False)
    for p in out.values():
        p.requires_grad_(True)
        p.grad = None
    return out


def torch_step(tu, data, prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    latents, noise = nchw(data["latents"]), nchw(data["noise"])
    t = torch.from_numpy(data["timesteps"])
    noisy = sched.add_noise(latents, noise, t)
    params = torch_trainable(tu)
    pred = tu(noisy, t, encoder_hidden_states=torch.from_numpy(data["text"]),
              added_cond_kwargs={"image_embeds": [torch.from_numpy(data["embeds"])[:, None]]}).sample
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt.step()
    return loss.item(), grads, {k: p.detach().numpy().copy() for k, p in params.items()}


def as_official(trainer, trainable, frozen) -> dict[str, np.ndarray]:
    """A trainable-state pytree (params or grads) -> official key layout."""
    return ip_adapter_state_dict(nnx.merge(trainer.unet_graphdef, trainable, frozen["unet"]).ip_adapters[0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_matches_pytorch(setup, prediction_type):
    import jax

    tu, unet, data = setup
    trainer, trainable, frozen = Trainer.create(unet, config=StepConfig(prediction_type=prediction_type),
                                                scheduler_config=SD15_SCHEDULER)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss))(trainable, frozen, data["latents"], data["text"],
                                                   data["embeds"], data["noise"], data["timesteps"])
    opt_state = trainer.init_optimizer(trainable)
    updates, _ = trainer.optimizer.update(grads, opt_state, trainable)
    updated = optax.apply_updates(trainable, updates)

    ref_loss, ref_grads, ref_updated = torch_step(tu, data, prediction_type)
    assert abs(float(loss) - ref_loss) / abs(ref_loss) <= 1e-5
    mine = as_official(trainer, grads, frozen)
    assert mine.keys() == ref_grads.keys()
    for key in ref_grads:
        assert rel_err(mine[key], ref_grads[key]) <= 1e-4, key
    mine_updated = as_official(trainer, updated, frozen)
    for key in ref_updated:
        assert rel_err(mine_updated[key], ref_updated[key]) <= 1e-5, key
    # Restore the reference's weights for the next parametrisation.
    for key, p in torch_trainable(tu).items():
        with torch.no_grad():
            p.copy_(torch.from_numpy(as_official(trainer, trainable, frozen)[key]))


def test_train_step_jits_and_lowers_the_loss(setup):
    import jax

    _, unet, data = setup
    trainer, trainable, frozen = Trainer.create(unet, optimizer=optax.adam(1e-3), scheduler_config=SD15_SCHEDULER)
    opt_state = trainer.init_optimizer(trainable)
    batch = {"latents": data["latents"], "text_embeds": data["text"], "empty_text": np.zeros_like(data["text"][0]),
             "image_embeds": data["embeds"]}
    step = jax.jit(trainer.train_step)
    losses = []
    for i in range(30):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(1), np.int32(0))
        losses.append(float(metrics["loss"]))
    # Same draws every step (fixed rng and step): a pure fit of this batch must go down.
    assert losses[-1] < 0.9 * losses[0], losses
    assert np.isfinite(losses).all()


def test_dropout_rates(setup):
    import jax

    _, unet, _ = setup
    trainer, _, _ = Trainer.create(unet, scheduler_config=SD15_SCHEDULER)
    draws = trainer.draw(jax.random.key(0), 200_000, (1, 1, 1, 1))
    img, txt = np.asarray(draws["drop_image"]), np.asarray(draws["drop_text"])
    assert abs(np.mean(img & ~txt) - 0.05) < 0.003      # image only
    assert abs(np.mean(txt & ~img) - 0.05) < 0.003      # text only
    assert abs(np.mean(img & txt) - 0.05) < 0.003       # both
    t = np.asarray(trainer.draw(jax.random.key(1), 100_000, (1, 1, 1, 1))["timesteps"])
    assert t.min() == 0 and t.max() == 999


def test_trainable_rule_must_select_something(setup):
    _, unet, _ = setup
    with pytest.raises(ValueError, match="selects no parameter"):
        Trainer.create(unet, trainable=r"^nothing/")


def test_remat_gives_the_same_gradients_with_less_memory(setup):
    """UNet remat policies recompute block activations in the backward pass: the
    same loss and gradients, and fewer bytes saved for the backward pass (the
    VJP's residuals; fewest for "full"). Not XLA's temp-memory estimate: since
    the blocked attention's backward recomputes its probabilities instead of
    storing them, the peak at this size is one block's backward, which remat
    does not shrink (BENCHMARKS.md, "Attention backward on CPU")."""
    import jax

    _, unet, data = setup
    rng = np.random.default_rng(5)
    big = rng.standard_normal((B, 48, 48, 4), dtype=np.float32)   # activations dominate memory here
    args = (big, data["text"], data["embeds"], rng.standard_normal(big.shape, dtype=np.float32), data["timesteps"])
    results = {}
    for remat in (False, "dots", True):
        unet.remat = remat
        trainer, trainable, frozen = Trainer.create(unet, scheduler_config=SD15_SCHEDULER)
        compiled = jax.jit(jax.value_and_grad(trainer.loss)).lower(trainable, frozen, *args).compile()
        loss, grads = compiled(trainable, frozen, *args)
        residuals = jax.eval_shape(lambda t, f: jax.vjp(lambda t: trainer.loss(t, f, *args), t)[1], trainable, frozen)
        results[remat] = (float(loss), jax.tree.leaves(grads), sum(x.size * x.dtype.itemsize
                                                                    for x in jax.tree.leaves(residuals)))
    unet.remat = False
    for policy in ("dots", True):
        assert abs(results[policy][0] - results[False][0]) <= 1e-6 * abs(results[False][0])
        for a, b in zip(results[policy][1], results[False][1]):
            assert rel_err(a, b) <= 1e-5
    assert results[True][2] < results[False][2], (results[True][2], results[False][2])
    assert results[True][2] <= results["dots"][2], (results[True][2], results["dots"][2])
    with pytest.raises(ValueError, match="selective"):
        remat_policy("selective")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weighting_is_diffusers_scripts(prediction_type):
    """``snr_gamma`` weights each sample's MSE as diffusers' training scripts do (``--snr_gamma``,
    ``training_utils.compute_snr``); 0 is the plain MSE."""
    import jax.numpy as jnp
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from ipadapter_jax.training.step import diffusion_loss

    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    rng = np.random.default_rng(0)
    pred, target = (rng.standard_normal((6, 8, 8, 4)).astype(np.float32) for _ in range(2))
    timesteps = np.array([0, 10, 250, 500, 900, 999])
    alphas = jnp.asarray(scheduler.alphas_cumprod.numpy(), jnp.float32)

    # The scripts' lines (train_text_to_image.py, --snr_gamma), in torch.
    t = torch.from_numpy(timesteps)
    snr = compute_snr(scheduler, t)
    weights = torch.stack([snr, 5.0 * torch.ones_like(t, dtype=snr.dtype)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    mse = torch.nn.functional.mse_loss(torch.from_numpy(pred), torch.from_numpy(target), reduction="none")
    expected = (mse.mean(dim=list(range(1, mse.ndim))) * weights).mean().item()

    ours = float(diffusion_loss(jnp.asarray(pred), jnp.asarray(target), alphas, jnp.asarray(timesteps),
                                prediction_type=prediction_type, snr_gamma=5.0))
    assert abs(ours - expected) <= 1e-5 * abs(expected)
    plain = float(np.mean((pred - target) ** 2))
    assert abs(ours - plain) > 1e-2 * plain      # the weighting changes the loss (the test can fail)
    assert float(diffusion_loss(jnp.asarray(pred), jnp.asarray(target), alphas, jnp.asarray(timesteps),
                                prediction_type=prediction_type)) == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("snr_gamma", -1.0, "step.snr_gamma must be a finite number >= 0"),
    ("image_drop_rate", float("nan"), "step.image_drop_rate must be a finite number >= 0"),
    ("both_drop_rate", 0.95, "must be <= 1"),
])
def test_recipe_fields_are_checked_by_name(field, value, message):
    from configs import sd15_ip_adapter

    from ipadapter_jax.io.errors import BadArgument
    from ipadapter_jax.training.ip_adapter_task import check_config

    cfg = sd15_ip_adapter.get_config()
    check_config(cfg)
    cfg.step[field] = value
    with pytest.raises(BadArgument, match=message):
        check_config(cfg)


def test_image_layers_field_is_checked_by_name():
    from configs import sd15_ip_adapter

    from ipadapter_jax.io.errors import BadArgument
    from ipadapter_jax.training.ip_adapter_task import check_config

    cfg = sd15_ip_adapter.get_config()
    assert cfg.model.image_layers == "all"
    cfg.model.image_layers = ""
    with pytest.raises(BadArgument, match="model.image_layers must be"):
        check_config(cfg)
    cfg.model.image_layers, cfg.step.image_conditioning = "up", "concat"
    with pytest.raises(BadArgument, match="simple adapter"):
        check_config(cfg)


def test_recipe_defaults_are_the_papers():
    from configs import sd15_ip_adapter

    from ipadapter_jax.training import ip_adapter_task

    cfg = sd15_ip_adapter.get_config()
    assert {name: cfg.step[name] for name in ip_adapter_task.DROP_RATES} == dict.fromkeys(ip_adapter_task.DROP_RATES,
                                                                                             0.05)
    assert cfg.step.snr_gamma == 0.0 and cfg.step.noise_offset == 0.0


def test_image_branches_on_some_layers_only(setup):
    """``model.image_layers``: the left-out layers' branches get no gradient, and export as zeros
    (what a file with a branch on every layer says for "no branch here")."""
    import jax

    from ipadapter_jax.io.errors import BadArgument
    from ipadapter_jax.ip_adapter import image_layer_mask
    from ipadapter_jax.training.ip_adapter_task import without_branches

    _, unet, data = setup
    cross = unet.cross_attention_layers()
    up = image_layer_mask(unet, "up")
    assert up.tolist() == [float(c.group == "up") for c in cross] and 0 < up.sum() < len(cross)
    assert image_layer_mask(unet, "all").tolist() == [1.0] * len(cross)
    names = [cross[0].name, cross[-1].name.removesuffix(".processor")]
    assert np.flatnonzero(image_layer_mask(unet, ",".join(names))).tolist() == [0, len(cross) - 1]
    mid_up = image_layer_mask(unet, "mid, up")
    assert mid_up.tolist() == [float(c.group in ("mid", "up")) for c in cross]
    with pytest.raises(BadArgument, match="up_blocks.9.attn2.*cross-attention layers"):
        image_layer_mask(unet, "up_blocks.9.attn2")

    trainer, trainable, frozen = Trainer.create(unet, scheduler_config=SD15_SCHEDULER,
                                                config=StepConfig(image_layer_scale=tuple(up)))
    grads = jax.grad(trainer.loss)(trainable, frozen, data["latents"], data["text"], data["embeds"], data["noise"],
                                   data["timesteps"])
    official = as_official(trainer, grads, frozen)
    for c in cross:
        norm = np.abs(official[f"ip_adapter.{2 * c.index + 1}.to_v_ip.weight"]).max()
        assert (norm > 0) == bool(up[c.index]), (c.name, norm)

    trained = nnx.merge(trainer.unet_graphdef, trainable, frozen["unet"]).ip_adapters[0]
    exported = ip_adapter_state_dict(without_branches(trained, up))
    for c in cross:
        for proj in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{2 * c.index + 1}.{proj}.weight"
            assert np.any(exported[key]) == bool(up[c.index])
            assert np.any(ip_adapter_state_dict(trained)[key])     # the training state is left as it was
