"""Evaluation during training (``train.eval_every``): what the adapter does now,
not only what its loss says (the official repository's custom-data runs that
"do not converge" are judged by samples, not by the loss curve).

At each evaluation step, with the weights being trained (their EMA when the
optimizer keeps one; layers left out by ``model.image_layers`` without their
image branch, as the export writes them):

* a fixed grid: for the first ``eval.grid`` held-out cases, the reference, a
  sample from the image prompt alone and one from the image prompt with its
  caption (same seeds every time), saved as ``<workdir>/samples/step_N.png``
  and sent to TensorBoard;
* with ``eval.clip_model``, CLIP-I and CLIP-T (``ipadapter_jax.eval``, the
  paper's metrics) of image-prompt-only samples over the held-out cases: each
  process scores its share (case ``k`` on process ``k mod N``) and the sums
  are gathered, so process 0 writes the mean over all of them.

Held-out cases are ``eval.cases``, a JSON list of ``{"image", "caption"}`` as
``ipadapter-eval --cases`` reads, or "demo": the demo's held-out shapes. Every process samples with its own local
copy of the frozen model (the components it loaded, before sharding), so an
evaluation needs no cross-host computation beyond gathering the adapter's
weights and the scores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ipadapter_jax.eval import ClipScorer, Generator, demo_cases, load_cases, to_uint8
from ipadapter_jax.io.images import load_rgb
from ipadapter_jax.pipeline.single_file import PIPELINES
from ipadapter_jax.training.optim import find_ema
from ipadapter_jax.training.runner import Evaluation


def _to_host(x) -> np.ndarray:
    """A (possibly global, multi-process) array as one local numpy array."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class LiveEval:
    """``runner.Task.evaluate`` for an IP-Adapter run: see the module docstring.
    ``components`` / ``image_encoder``: the run's loaded modules (shared, not copied);
    ``mask``: ``model.image_layers`` per cross-attention layer (1.0 / 0.0)."""

    def __init__(self, cfg, components, image_encoder, mask, workdir: str | Path):
        e = cfg.eval      # checked by ``ip_adapter_task.check_config``
        # Own module objects over the same arrays: the run's UNet stays as the trainer split it.
        unet = nnx.merge(*nnx.split(components.unet))
        self.unet, self.adapter = unet, unet.ip_adapters[0]
        self.mask = np.asarray(mask)
        pipe_cls = PIPELINES[components.family.pipeline]
        self.pipe = pipe_cls.from_components(dataclasses.replace(components, unet=unet), image_encoder=image_encoder)
        size = e.get("size", 0) or cfg.data.resolution
        self.generator = Generator(self.pipe, self.adapter, conditioning=cfg.step.get("image_conditioning",
                                                                                     "decoupled"),
                                   steps=e.get("steps", 25), guidance=e.get("guidance", 5.0), height=size, width=size)
        # "demo": the demo's held-out shapes (test split), as ``ipadapter-eval --demo`` scores them.
        self.cases = demo_cases(e.get("num_cases", 0) or 64) if e.cases == "demo" else load_cases(e.cases)
        n = e.get("num_cases", 0) or len(self.cases)
        self.scored = self.cases[:n]
        self.grid = self.cases[:e.get("grid", 4)]
        self.scale, self.seed, self.size = float(e.get("scale", 1.0)), int(e.get("seed", 0)), size
        self.scorer = ClipScorer(e.clip_model) if e.get("clip_model") else None
        self.samples = Path(workdir) / "samples"

    def _load(self, state) -> None:
        """The run's current weights (EMA when kept) into the evaluation's UNet and adapter."""
        weights = find_ema(state["opt_state"])
        weights = jax.tree.map(_to_host, state["trainable"] if weights is None else weights)
        adapter = weights.get("ip_adapters")
        rest = nnx.State({k: v for k, v in weights.items() if k != "ip_adapters"})
        if adapter is not None:
            nnx.update(self.adapter, adapter[0])
        if len(rest):
            nnx.update(self.unet, rest)
        for layer, keep in zip(self.adapter.layers, self.mask, strict=True):
            if not keep:   # as the export writes a left-out layer: no image branch
                layer.to_v_ip.kernel[...] = jnp.zeros_like(layer.to_v_ip.kernel[...])

    def _scores(self) -> dict[str, float]:
        """Mean CLIP-I / CLIP-T over every process's share of the scored cases."""
        sums = np.zeros(3)
        mine = [(k, c) for k, c in enumerate(self.scored) if k % jax.process_count() == jax.process_index()]
        if mine:
            refs = self.scorer.image_embeds([c.reference for _, c in mine])
            texts = self.scorer.text_embeds([c.caption for _, c in mine])
            for j, (k, case) in enumerate(mine):
                gen = self.scorer.image_embeds(list(to_uint8(self.generator(case, "image", self.scale,
                                                                            self.seed + k))))
                sums += [float(np.mean(gen @ refs[j])), float(np.mean(gen @ texts[j])), 1.0]
        if jax.process_count() > 1:
            sums = np.sum(multihost_utils.process_allgather(sums), axis=0)
        return {"clip_i": sums[0] / sums[2], "clip_t": sums[1] / sums[2], "clip_cases": sums[2]}

    def _grid(self, step: int) -> np.ndarray:
        """Rows: the grid's cases; columns: reference, image prompt, image prompt + caption."""
        from PIL import Image

        rows = []
        for k, case in enumerate(self.grid):
            reference = np.asarray(load_rgb(case.reference).resize((self.size, self.size), Image.BICUBIC))
            cells = [reference] + [to_uint8(self.generator(case, mode, self.scale, self.seed + k))[0]
                                   for mode in ("image", "image+text")]
            rows.append(np.concatenate(cells, axis=1))
        grid = np.concatenate(rows, axis=0)
        self.samples.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(self.samples / f"step_{step:07d}.png")
        return grid

    def __call__(self, step: int, state) -> Evaluation:
        self._load(state)
        scalars = self._scores() if self.scorer is not None else {}
        images = {"samples": self._grid(step)} if self.grid and jax.process_index() == 0 else {}
        return Evaluation(scalars, images)
