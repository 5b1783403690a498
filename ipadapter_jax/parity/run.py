"""One parity run: the reference pass (diffusers / transformers, float32),
then our pass for each dtype asked, component by component, each side freed
before the next loads, into a ``Report``.

Inputs are seeded and of the real shapes (the model's latent size, 77 text
tokens, the encoder's resolution); where a component's input is another
component's output (the UNet's text conditioning, the projections' image
embeddings) the reference's output is used, so each figure measures one
component. Blocks are fed the reference block's inputs. The trajectory runs
both sampling loops from the same noise with the same prompt and images.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ipadapter_jax import ip_adapter
from ipadapter_jax.families.text import added_conditioning, time_ids
from ipadapter_jax.io.errors import BadArgument
from ipadapter_jax.io.files import read_npy
from ipadapter_jax.io.images import preprocess
from ipadapter_jax.parity import jax_run as ours
from ipadapter_jax.parity import reference_run as ref
from ipadapter_jax.parity.blocks import BlockInputs, block_figures
from ipadapter_jax.pipeline import ImagePromptSpec
from ipadapter_jax.pipeline.control import ControlNetSpec, load_control_image
from ipadapter_jax.parity.metrics import Figure, bounds_for, figure, first_over

# Component groups (``--components``), in the order they run.
GROUPS = ("text", "image_encoder", "image_proj", "unet", "unet_ip", "controlnet", "vae", "trajectory")
TIMESTEP = 500   # the components' timestep: mid-schedule, where text and image conditioning both matter


@dataclasses.dataclass
class Request:
    """What to compare (see ``ipadapter-parity --help``). ``images``: one
    path per adapter, or all for a single adapter; ``face_embeds`` one .npy
    per FaceID adapter; ``control_images`` one per ControlNet."""

    prompt: str = ""
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 10
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    scales: Sequence[float] = ()
    images: Sequence[str] = ()
    face_embeds: Sequence[str] = ()
    control_images: Sequence[str] = ()
    control_scales: Sequence[float] = ()
    depth: int = 1
    groups: Sequence[str] = GROUPS
    dtype: str = "float32"
    bound: float | None = None


@dataclasses.dataclass
class Result:
    """One dtype's figures: components (each with its blocks), trajectory
    steps and the decoded image."""

    dtype: str
    components: list[tuple[Figure, list[Figure]]] = dataclasses.field(default_factory=list)
    trajectory: list[Figure] = dataclasses.field(default_factory=list)
    image: Figure | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _scales(req: Request, n: int) -> list[float]:
    if not req.scales:
        return [1.0] * n
    return list(req.scales) * n if len(req.scales) == 1 else list(req.scales)


def _images_per_adapter(req: Request, kinds: list[str]) -> list[list[str]]:
    users = [i for i, k in enumerate(kinds) if k != "face_id"]
    out = [[] for _ in kinds]
    if len(users) == 1:
        out[users[0]] = list(req.images)
    else:
        for i, path in zip(users, req.images):
            out[i] = [path]
    return out


def _load_pil(path: str):
    """An image as a diffusers user loads it (``diffusers.utils.load_image``: EXIF rotation, RGB)."""
    from diffusers.utils import load_image

    return load_image(str(path))


def reference_pass(pipe, req: Request, family, progress: Callable[[str, dict], None]) -> dict:
    """Every reference figure source, as numpy: {"rows": {name: Row}, "trajectory": ..., "call": ...};
    ``progress(part, rows)`` after each part."""

    rng = np.random.default_rng(req.seed)
    scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = req.height or pipe.unet.config.sample_size * scale_factor
    w = req.width or pipe.unet.config.sample_size * scale_factor
    lh, lw = h // scale_factor, w // scale_factor
    out: dict = {"rows": {}, "size": (h, w), "notes": []}
    rows = out["rows"]
    groups = set(req.groups)
    if "text" in groups:
        rows.update(ref.text_rows(pipe, req.prompt, req.depth))
        progress("text", rows)

    # Image encoder and projections: the reference embeddings feed both sides' projections and UNets.
    n_adapters = len(pipe.unet.encoder_hid_proj.image_projection_layers) if getattr(
        pipe.unet, "encoder_hid_proj", None) is not None else 0
    kinds = [ref.projection_input_kind(pipe, i) for i in range(n_adapters)]
    per_adapter = _images_per_adapter(req, kinds)
    encoder = getattr(pipe, "image_encoder", None)
    encoded = None
    if encoder is not None:
        size = encoder.config.image_size
        pixels = (preprocess(list(req.images[:1]), size, size) if req.images
                  else rng.standard_normal((1, size, size, 3)).astype(np.float32))
        encoded = ref.image_encoder_row(pipe, pixels, req.depth)
        if "image_encoder" in groups:
            rows["image_encoder"] = encoded
        progress("image_encoder", rows)
    faces = iter(req.face_embeds)
    embeds = []
    for i, kind in enumerate(kinds):
        if kind == "face_id":
            face = next(faces, None)
            width = ref.projection_input_width(pipe, i)
            e = (read_npy(face).astype(np.float32).reshape(-1, width)[:1] if face is not None
                 else rng.standard_normal((1, width)).astype(np.float32))
        elif kind and encoded is not None:
            e = encoded.outputs[0 if kind == "image_embeds" else 1]
        else:
            e = None
            out["notes"].append(f"image_proj.{i}: not compared ({kind or 'this projection type'} needs inputs "
                                "the parity run does not build)")
        embeds.append(e)
        if e is not None and "image_proj" in groups:
            rows[f"image_proj.{i}"] = ref.projection_row(pipe, i, e)
    progress("image_proj", rows)

    # UNet inputs: seeded latents, the pipeline's own text conditioning, SDXL's added conditioning.
    context, pooled = ref.conditioning(pipe, req.prompt)
    added = added_conditioning(family, pooled, time_ids((h, w), (0, 0), (h, w)))
    unet_in = {"sample": rng.standard_normal((1, lh, lw, pipe.unet.config.in_channels)).astype(np.float32),
               "t": np.array([TIMESTEP]), "context": context, "added": added,
               "embed_shapes": [np.shape(e)[1:] if e is not None else (1,) for e in embeds]}
    comparable = n_adapters and all(e is not None for e in embeds)
    if n_adapters and not comparable and {"unet", "unet_ip"} & groups:
        out["notes"].append("unet, unet+ip: not compared (an adapter's projection input is not built here)")
    if "unet" in groups and (comparable or not n_adapters):
        rows["unet"] = ref.unet_row(pipe, unet_in, req.depth, None)
        progress("unet", rows)
    if n_adapters and "unet_ip" in groups and comparable:
        pipe.set_ip_adapter_scale(_scales(req, n_adapters))
        rows["unet+ip"] = ref.unet_row(pipe, dict(unet_in, embeds=embeds, scales=_scales(req, n_adapters)),
                                       req.depth, embeds)
        progress("unet+ip", rows)
    if "controlnet" in groups:
        control = [load_control_image(p, h, w) for p in req.control_images]
        rows.update(ref.controlnet_rows(pipe, unet_in, control, req.depth))
        progress("controlnet", rows)
    if "vae" in groups:
        images = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
        latents = rng.standard_normal((1, lh, lw, pipe.vae.config.latent_channels)).astype(np.float32)
        rows.update(ref.vae_rows(pipe, images, latents, req.depth))
        progress("vae", rows)
    if "trajectory" in groups:
        out.update(_reference_trajectory(pipe, req, kinds, per_adapter, (h, w), rng, out["notes"]))
        progress("trajectory", rows)
    return out


def _reference_trajectory(pipe, req, kinds, per_adapter, size, rng, notes) -> dict:
    h, w = size
    if req.scheduler == "euler-a":
        notes.append("trajectory: not compared with euler-a (each framework draws its own noise at every step)")
        return {}
    if any(k != "image_embeds" and k != "hidden_states" for k in kinds):
        notes.append("trajectory: not compared with FaceID adapters (their ID embeddings go in as "
                     "ip_adapter_image_embeds, which the parity run does not build)")
        return {}
    if any(not images for images in per_adapter):
        notes.append("trajectory: not compared (give each adapter its reference image with --image)")
        return {}
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    noise = rng.standard_normal((1, h // factor, w // factor, pipe.unet.config.in_channels)).astype(np.float32)
    call = dict(prompt=req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance, height=h, width=w)
    if req.negative_prompt is not None:
        call["negative_prompt"] = req.negative_prompt
    ours = dict(call)
    if kinds:
        pipe.set_ip_adapter_scale(_scales(req, len(kinds)))
        call["ip_adapter_image"] = [[_load_pil(p) for p in imgs] for imgs in per_adapter]
    if req.control_images:
        images = [_load_pil(p) for p in req.control_images]
        call["image"] = images if len(images) > 1 else images[0]
        scales = list(req.control_scales) or [1.0]
        scales = scales * len(images) if len(scales) == 1 else scales
        call["controlnet_conditioning_scale"] = scales if len(images) > 1 else scales[0]
    steps, image = ref.trajectory(pipe, call, noise)
    return {"trajectory": steps, "image": image, "noise": noise, "call": ours, "per_adapter": per_adapter}


def jax_pass(load: Callable[[], object], reference: dict, req: Request, dtype: str,
             show_progress: bool = True) -> Result:
    """Our figures against the reference pass, for our pipeline ``load()``
    builds in ``dtype``, each model dropped once its last use is done (a
    full-size SDXL pipeline does not fit 24 GB beside its VAE's activations or
    its bfloat16 compute copy): the trajectory's request is prepared, the
    encoders' components run, the encoders go, the loop runs, then the UNet's,
    ControlNets' and VAE's components. A progress bar per component (its
    blocks)."""
    from tqdm.auto import tqdm

    import jax.numpy as jnp

    result = Result(dtype, notes=list(reference["notes"]))
    rows = reference["rows"]
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    pipe = load()
    free()   # what loading left on the heap
    request = _jax_request(pipe, reference, req) if "trajectory" in reference else None
    parts = {"text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None),
             "image_encoder": pipe.image_encoder}

    def add(name, outputs, row, root, env):
        blocks = []
        if root is not None and row.blocks:
            with tqdm(total=len(row.blocks), desc=f"{dtype} {name}", unit="block", leave=False,
                      disable=not show_progress) as bar:
                blocks = block_figures(root, row.blocks, env, lambda: (bar.update(1), free()))
        result.components.append((figure(name, outputs, row.outputs), blocks))

    for slot in ("text_encoder", "text_encoder_2"):
        encoder = parts.pop(slot)
        if slot in rows:
            outputs, pooled = ours.text_outputs(encoder, rows[slot])
            env = BlockInputs(compute, clip_mask=ours.clip_mask(rows[slot].inputs["ids"]))
            add(slot, outputs, rows[slot], encoder, env)
            add(f"{slot}.pooled", pooled, rows[f"{slot}.pooled"], None, None)
        del encoder
        free()
    encoder = parts.pop("image_encoder")
    if "image_encoder" in rows:
        add("image_encoder", ours.image_encoder_outputs(encoder, rows["image_encoder"]),
            rows["image_encoder"], encoder, BlockInputs(compute))
    del encoder, parts
    pipe.free_encoders()   # the loop needs the UNet, ControlNets and VAE only
    free()
    if request is not None:
        steps, image = ours.trajectory(pipe, request)
        result.trajectory, result.image = _trajectory_figures(steps, image, reference)
        del request
    parts = {"unet": pipe.unet, "vae": pipe.vae, "controlnets": list(pipe.controlnets)}
    adapters = list(pipe.unet.ip_adapters)
    del pipe
    free()
    for i, adapter in enumerate(adapters):
        row = rows.get(f"image_proj.{i}")
        if row is not None:
            add(f"image_proj.{i}", [np.asarray(adapter.project(row.inputs["embeds"]), np.float32)], row, None, None)
    unet = parts.pop("unet")
    if "unet" in rows:
        add("unet", ours.unet_outputs(unet, rows["unet"]), rows["unet"], unet,
            BlockInputs(compute, ip=lambda tokens: ()))
        free()
    if "unet+ip" in rows:
        row = rows["unet+ip"]
        scales = [ip_adapter.layer_scales(unet, s) for s in row.inputs["scales"]]
        prompts = tuple(ip_adapter.image_prompt(a, a.project(e)[:, None], s)
                        for a, e, s in zip(adapters, row.inputs["embeds"], scales))
        make_ip = lambda tokens, adapters=adapters: tuple(   # noqa: E731  the reference's tokens, our scales
            (a, ip_adapter.image_prompt(a, jnp.asarray(t), s)) for a, t, s in zip(adapters, tokens, scales))
        add("unet+ip", ours.unet_outputs(unet, row, prompts), row, unet, BlockInputs(compute, ip=make_ip))
    del unet, adapters
    free()
    for i, net in enumerate(parts.pop("controlnets")):
        row = rows.get(f"controlnet.{i}")
        if row is not None:
            add(f"controlnet.{i}", ours.controlnet_outputs(net, row), row, net, BlockInputs(compute))
        del net
        free()
    vae = parts.pop("vae")
    if "vae.encoder" in rows:
        outputs = ours.vae_outputs(vae, rows)
        free()
        for name in ("vae.encoder", "vae.decoder"):
            add(name, outputs[name], rows[name], vae, BlockInputs(vae.dtype))
    return result


def _jax_request(pipe, reference: dict, req: Request):
    """Our pipeline's prepared request for the reference trajectory's call."""
    call = dict(reference["call"], scheduler=req.scheduler)
    adapters = list(pipe.unet.ip_adapters)
    if adapters:
        scales = _scales(req, len(adapters))
        call["ip_adapter_prompts"] = [ImagePromptSpec(images=imgs or None, scale=s)
                                      for imgs, s in zip(reference["per_adapter"], scales)]
    if req.control_images:
        scales = list(req.control_scales) or [1.0]
        scales = scales * len(req.control_images) if len(scales) == 1 else scales
        call["controlnet_inputs"] = [ControlNetSpec(p, scale=s) for p, s in zip(req.control_images, scales)]
    return ours.prepare_trajectory(pipe, call, reference["noise"])


def _trajectory_figures(steps: list, image, reference: dict) -> tuple[list[Figure], Figure]:
    figures = [figure(f"step {i + 1}", a, e) for i, (a, e) in enumerate(zip(steps, reference["trajectory"]))]
    if len(steps) != len(reference["trajectory"]):
        figures.append(Figure("steps", float("inf"), float("inf"),
                              f"{len(steps)} steps vs reference {len(reference['trajectory'])}"))
    return figures, figure("image", image, reference["image"])


def compare(load_reference: Callable[[], object], load_ours: Callable[[str], object], family, req: Request,
            *, show_progress: bool = True) -> tuple[list[Result], dict]:
    """The whole run: ``load_reference()`` -> the diffusers pipeline (freed
    after its pass), then ``load_ours(dtype)`` -> our pipeline for float32
    and, with ``req.dtype == "bfloat16"``, bfloat16 (each freed after its
    pass). Returns (one ``Result`` per dtype, the reference pass)."""
    from tqdm.auto import tqdm

    check_request(req)
    with tempfile.TemporaryDirectory(prefix="ipadapter-parity-") as folder:
        pipe = load_reference()
        with tqdm(total=len(req.groups), desc="reference", unit="part", leave=False,
                  disable=not show_progress) as bar:
            def progress(name: str, rows: dict) -> None:
                spill(rows, Path(folder))   # each component's captures leave memory as it finishes
                bar.set_postfix_str(name)

            reference = reference_pass(pipe, req, family, progress)
            bar.update(len(req.groups))
        del pipe
        free()
        results = _our_passes(load_ours, reference, req, show_progress)
        del reference["rows"]   # the memory maps, before their folder goes
        free()
    return results, reference


def _our_passes(load_ours, reference: dict, req: Request, show_progress: bool) -> list[Result]:
    import jax

    results = []
    for dtype in ("float32", "bfloat16") if req.dtype == "bfloat16" else ("float32",):
        results.append(jax_pass(lambda: load_ours(dtype), reference, req, dtype, show_progress))
        jax.clear_caches()   # the executables of this dtype's models (the next pass compiles its own)
        free()
    return results


SPILL_BYTES = 1 << 20


def spill(rows: dict, folder: Path) -> None:
    """Move the large arrays of ``rows`` (captured block inputs and outputs,
    component inputs and outputs) to .npy files in ``folder`` and map them
    back read-only: their pages are then the kernel's to drop and reread, not
    memory the next component (or our pass) competes with. Rows already
    spilled are left alone."""
    def out(x):
        if isinstance(x, np.ndarray) and not isinstance(x, np.memmap) and x.nbytes >= SPILL_BYTES:
            path = folder / f"{len(list(folder.iterdir()))}.npy"
            np.save(path, x)
            return np.load(path, mmap_mode="r")
        if isinstance(x, tuple):
            return tuple(out(v) for v in x)
        if isinstance(x, list):
            return [out(v) for v in x]
        if isinstance(x, dict):
            return {k: out(v) for k, v in x.items()}
        return x

    for row in rows.values():
        row.outputs, row.inputs = out(row.outputs), out(row.inputs)
        for captured in row.blocks.values():
            captured.args, captured.kwargs, captured.output = (out(captured.args), out(captured.kwargs),
                                                               out(captured.output))
    free()


def free() -> None:
    """Collect what a freed pipeline left in reference cycles (NNX modules
    hold some) and hand the freed heap back to the system (glibc keeps it
    otherwise: loading a pipeline leaves about half its size behind), so the
    next side loads into the memory this one used."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


def check_request(req: Request) -> None:
    """Request values no model is needed to refuse."""
    unknown = [g for g in req.groups if g not in GROUPS]
    if unknown:
        raise BadArgument(f"unknown components {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    if req.depth not in (1, 2):
        raise BadArgument(f"depth must be 1 (blocks) or 2 (their children), got {req.depth}")
    if req.dtype not in ("float32", "bfloat16"):
        raise BadArgument(f"dtype must be float32 or bfloat16, got {req.dtype!r}")


def over_bounds(results: Sequence[Result], bound: float | None) -> list[str]:
    """Every figure past its dtype's bound, named: component and block rows,
    trajectory steps, the image's max abs."""
    bad = []
    for result in results:
        bounds = bounds_for(result.dtype, bound)
        for comp, blocks in result.components:
            if comp.over(bounds["component"]):
                bad.append(f"{result.dtype} {comp.name}")
            first = first_over(blocks, bounds["block"])
            if first:
                bad.append(f"{result.dtype} {comp.name}: {first}")
        bad += [f"{result.dtype} trajectory {f.name}" for f in result.trajectory if f.over(bounds["step"])]
        if result.image is not None and not result.image.max_abs <= bounds["image_max_abs"]:
            bad.append(f"{result.dtype} image")
    return bad
