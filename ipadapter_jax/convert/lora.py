"""LoRA files merged into a pipeline's weights once, at load (no cost per step).

Two file formats, told apart by their keys:

* kohya (A1111, ComfyUI, civitai): ``lora_unet_<module>``, ``lora_te_<module>``
  (SD 1.x / 2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders),
  each with ``.lora_down.weight``, ``.lora_up.weight`` and an optional
  ``.alpha``. ``<module>`` is the module path with ``.`` -> ``_``: diffusers'
  UNet names for SD 1.x (``down_blocks_0_attentions_0_...``), the sgm / LDM
  names for SDXL (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, mapped
  by ``sgm_to_diffusers``), transformers' names for the text encoders
  (``text_model_encoder_layers_0_self_attn_q_proj``). LoCon files add 3x3
  ResNet and sampler convolutions (a k x k ``lora_down`` and a 1x1 ``lora_up``).
* diffusers / PEFT (``save_lora_weights``): ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight`` (also ``lora_A.default.weight``, and diffusers' older
  ``lora.down`` / ``lora_linear_layer.down`` / ``processor.to_q_lora.down``
  spellings), ``text_encoder.*``, ``text_encoder_2.*``; the scaling comes from
  an optional ``<module>.alpha`` tensor or the ``lora_adapter_metadata`` JSON
  diffusers writes into the safetensors header (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``).

Each layer adds ``scale * alpha / rank * up @ down`` (rsLoRA:
``alpha / sqrt(rank)``; no alpha, or alpha 0, means alpha = rank) to the weight
of the module it names, in our layout (Linear ``[in, out]``, Conv HWIO). The
file is checked whole before anything changes: a layer the model lacks, a rank
or shape that does not fit, or a LoRA made for another base model (SDXL vs SD
1.x / 2.x) is an error naming it, and the model is left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.convert.ldm_unet import RESNET_FROM_LDM, TOP, diffusers_sublayer, unet_blocks
from ipadapter_jax.io.hub import resolve
from ipadapter_jax.io.specs import parse_lora_spec
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, Unsupported, require_finite
from ipadapter_jax.io.files import is_safetensors, read_safetensors_header, read_state_dict
from ipadapter_jax.io.params import to_flax_layout
from ipadapter_jax.models.unet import UNetConfig

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SDXL, SD = "SDXL", "SD 1.x/2.x"
# Families by the width of the text context their cross-attention reads.
_CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclasses.dataclass
class LoraLayer:
    """One low-rank pair of a file: ``down`` [r, in] or [r, in, kh, kw], ``up`` [out, r] or [out, r, 1, 1]."""

    component: str          # "unet", "text_encoder" or "text_encoder_2"
    name: str               # the module as the file names it (kohya: with "_"; PEFT: dotted)
    key: str                # the file's key of ``down`` (for messages)
    down: np.ndarray
    up: np.ndarray
    alpha: float | None     # None: alpha = rank
    rslora: bool = False    # scaling alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scaling(self) -> float:
        alpha = self.alpha if self.alpha else float(self.rank)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass
class LoraFile:
    path: Path
    format: str             # "kohya" or "peft"
    layers: list[LoraLayer]


@dataclasses.dataclass
class LoraReport:
    """What ``apply_lora`` merged: per component the module names changed, and
    (``lenient=True`` only) the file's layers that the model lacks."""

    path: str
    format: str
    scale: float
    applied: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        counts = ", ".join(f"{len(v)} {k} layers" for k, v in self.applied.items() if v) or "nothing"
        text = f"LoRA {self.path} ({self.format}, scale {self.scale:g}): merged {counts}"
        if self.skipped:
            more = f" ... and {len(self.skipped) - 8} more" if len(self.skipped) > 8 else ""
            text += f"; skipped {len(self.skipped)} layers the model lacks: {', '.join(self.skipped[:8])}{more}"
        return text


# --------------------------------------------------------------------------- reading

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Other network types found in LoRA-like files: named in the refusal.
_OTHER_NETWORKS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with a Tucker mid weight",
                   "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "a full weight difference",
                   "ia3": "IA3", "oft_": "OFT", "boft_": "BOFT", "glora_": "GLoRA"}
_PEFT_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_A.default.weight", "down"),
               (".lora_B.default.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
               (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
               (".alpha", "alpha"))
# diffusers' oldest format: ``attn1.processor.to_q_lora.down.weight`` (UNet), ``self_attn.to_q_lora...`` (CLIP).
_OLD_PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_OLD_NAMES = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
              "text": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
METADATA_KEY = "lora_adapter_metadata"


def _other_network(key: str) -> str | None:
    """The network type a non-LoRA key belongs to (``x.hada_w1_a``: LoHa), None if none known."""
    return next((kind for part in key.split(".")[1:] for marker, kind in _OTHER_NETWORKS.items()
                 if part.startswith(marker)), None)


def _scalar(value: np.ndarray, key: str, path: Path) -> float:
    array = np.asarray(value, dtype=np.float64)
    if array.size != 1 or not np.isfinite(array).all():
        shown = array.reshape(-1)[:3] if array.size else "an empty array"
        raise BadFile(f"{path}: {key} must be one finite number, got {shown} (shape {array.shape})")
    return float(array.reshape(()))


def _pairs(groups: dict, path: Path, fmt: str) -> list[tuple]:
    """(component, name, parts) for groups with both weights; a half pair is an error."""
    out = []
    for (component, name), parts in groups.items():
        missing = [r for r in ("down", "up") if r not in parts]
        if missing:
            have = ", ".join(sorted(k for _, k in parts.values()))
            raise BadFile(f"{path}: {fmt} LoRA layer {name!r} has no {' / '.join(missing)} weight (found {have})")
        out.append((component, name, parts))
    return out


def _read_kohya(state: dict, path: Path) -> LoraFile:
    groups: dict[tuple, dict] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        prefix, component = next(((p, c) for p, c in _KOHYA_PREFIXES if name.startswith(p)), (None, None))
        role = _KOHYA_ROLES.get(suffix)
        if prefix is None or role is None:
            kind = _other_network(key)
            if kind:
                raise Unsupported(f"{path}: {key!r} belongs to a {kind} network; only LoRA (lora_down / lora_up "
                                  "with alpha) and LoCon are supported")
            raise BadFile(f"{path}: {key!r} is not a kohya LoRA key (lora_unet_* / lora_te_* / lora_te1_* / "
                          "lora_te2_* with .lora_down.weight, .lora_up.weight or .alpha)")
        groups.setdefault((component, name[len(prefix):]), {})[role] = (value, key)
    layers = []
    for component, name, parts in _pairs(groups, path, "kohya"):
        alpha = _scalar(parts["alpha"][0], parts["alpha"][1], path) if "alpha" in parts else None
        layers.append(LoraLayer(component, name, parts["down"][1], parts["down"][0], parts["up"][0], alpha))
    return LoraFile(path, "kohya", layers)


def _peft_role(component: str, rest: str) -> tuple[str, str] | None:
    """(module, role) of a PEFT / diffusers key without its component prefix."""
    old = _OLD_PROCESSOR.match(rest)
    if old:
        names = _OLD_NAMES["unet" if component == "unet" else "text"]
        return f"{old.group(1)}.{names[old.group(2)]}", old.group(3)
    for suffix, role in _PEFT_ROLES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], role
    return None


def _peft_metadata(path: Path) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (``{"unet.lora_alpha": 8, ...}``) per component."""
    if not is_safetensors(path):
        return {}
    raw = read_safetensors_header(path)[1].get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadFile(f"{path}: the {METADATA_KEY} header is not valid JSON: {e}") from None
    per: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field = key.partition(".")
        per.setdefault(component, {})[field] = value
    return per


def _peft_alpha(config: dict, module: str, path: Path) -> tuple[float | None, bool]:
    """(alpha, rslora) of a module from its component's LoRA config (PEFT's alpha_pattern rule)."""
    if config.get("use_dora"):
        raise Unsupported(f"{path}: a DoRA adapter (use_dora in its metadata); only LoRA is supported")
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora"))


def _read_peft(state: dict, path: Path) -> LoraFile:
    metadata = _peft_metadata(path)
    groups: dict[tuple, dict] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        parsed = _peft_role(component, rest) if component in COMPONENTS else None
        if parsed is None:
            kind = _other_network(key)
            if kind:
                raise Unsupported(f"{path}: {key!r} belongs to a {kind} network; only LoRA is supported")
            raise BadFile(f"{path}: {key!r} is not a LoRA key: expected kohya keys (lora_unet_*, lora_te*_) or "
                          "diffusers / PEFT keys (unet.* / text_encoder.* / text_encoder_2.* ending in "
                          ".lora_A.weight, .lora_B.weight or .alpha)")
        module, role = parsed
        groups.setdefault((component, module), {})[role] = (value, key)
    layers = []
    for component, module, parts in _pairs(groups, path, "PEFT"):
        alpha, rslora = _peft_alpha(metadata.get(component, {}), module, path)
        if "alpha" in parts:
            alpha = _scalar(parts["alpha"][0], parts["alpha"][1], path)
        layers.append(LoraLayer(component, module, parts["down"][1], parts["down"][0], parts["up"][0], alpha,
                                rslora))
    return LoraFile(path, "peft", layers)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file (kohya or diffusers / PEFT, ``.safetensors`` or a
    weights-only torch pickle) into its layers, without a model."""
    path = Path(path)
    state = read_state_dict(path)
    if not state:
        raise BadFile(f"{path} holds no tensors; expected a LoRA file")
    if all(k.startswith("lora_") for k in state):
        lora = _read_kohya(state, path)
    else:
        lora = _read_peft(state, path)
    for layer in lora.layers:
        _check_shapes(layer, path)
        require_finite(f"{path}: {layer.key}", layer.down)
        require_finite(f"{path}: the up weight beside {layer.key}", layer.up)
    return lora


def _check_shapes(layer: LoraLayer, path: Path) -> None:
    """A low-rank pair that can be multiplied: down [r, in] or [r, in, kh, kw],
    up [out, r] or [out, r, 1, 1], r >= 1; else an error naming the key."""
    down, up = layer.down, layer.up
    shapes = f"down {tuple(down.shape)} / up {tuple(up.shape)}"
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise BadFile(f"{path}: LoRA layer {layer.key!r}: {shapes}; expected 2-D (linear) or 4-D (convolution) "
                      "weights")
    if down.shape[0] == 0 or up.shape[1] == 0:
        raise BadFile(f"{path}: LoRA layer {layer.key!r} has rank 0 ({shapes}); a LoRA layer has rank >= 1")
    if 0 in down.shape or 0 in up.shape:
        raise BadFile(f"{path}: LoRA layer {layer.key!r}: {shapes}; a weight with a dimension of size 0")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise Unsupported(f"{path}: LoRA layer {layer.key!r} has a {up.shape[2]}x{up.shape[3]} up kernel; only 1x1 "
                          "up projections (LoRA / LoCon) are supported")
    if up.shape[1] != layer.rank:
        raise Incompatible(f"{path}: LoRA layer {layer.key!r}: rank mismatch, down {tuple(down.shape)} has rank "
                           f"{layer.rank} but up {tuple(up.shape)} expects rank {up.shape[1]}")


# --------------------------------------------------------------------------- sgm (LDM) UNet names

# The LDM layout (``convert.ldm_unet``) read the other way: LDM name -> diffusers name.
_SGM_FIXED = {ldm: name for name, ldm in TOP.items()}


def sgm_to_diffusers(path: str, config: UNetConfig) -> str | None:
    """An sgm / LDM UNet module path (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``,
    ``input_blocks.3.0.op``, ``output_blocks.2.2.conv``, ``time_embed.0``) ->
    our diffusers module path for a UNet of ``config``; None when this UNet has
    no such block."""
    if path in _SGM_FIXED:
        return _SGM_FIXED[path]
    blocks = unet_blocks(config)
    match = re.match(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.(.+)$", path)
    if not match or match.group(1) not in blocks:
        return None
    prefix, role = blocks[match.group(1)]
    sub = diffusers_sublayer(role, match.group(2))
    return None if sub is None else f"{prefix}.{sub}"


_KOHYA_SGM = re.compile(r"^(?:(input_blocks|output_blocks)_(\d+)_(\d+)|(middle_block)_(\d+))_(.+)$")
_KOHYA_SGM_FIXED = {k.replace(".", "_"): v for k, v in _SGM_FIXED.items()}
_KOHYA_RESNET = {k.replace(".", "_"): k for k in RESNET_FROM_LDM}


def _kohya_sgm_name(name: str, blocks: dict[str, tuple[str, str]]) -> str | None:
    """A kohya SDXL UNet name (sgm path with ``_``) -> the diffusers module path
    with ``_`` (looked up like SD 1.x names), None when this UNet has no such block.
    ``blocks``: ``unet_blocks`` of the UNet's config."""
    if name in _KOHYA_SGM_FIXED:
        return _KOHYA_SGM_FIXED[name].replace(".", "_")
    match = _KOHYA_SGM.match(name)
    if not match:
        return None
    kind, i, j, middle, m, rest = match.groups()
    prefix, role = blocks.get(f"{kind}.{i}.{j}" if kind else f"{middle}.{m}", (None, None))
    if prefix is None:
        return None
    sub = diffusers_sublayer(role, _KOHYA_RESNET.get(rest, rest) if role == "resnet" else rest)
    return None if sub is None else f"{prefix}.{sub}".replace(".", "_")


def _names_sgm_blocks(name: str) -> bool:
    """A kohya UNet name in the sgm / LDM spelling (kohya trains SDXL on that UNet)."""
    return bool(_KOHYA_SGM.match(name)) or name.startswith(("time_embed_", "label_emb_", "input_blocks_0_0"))


# --------------------------------------------------------------------------- the model side

class _Targets:
    """One component's Linear / Conv kernels by module path (torch spelling,
    ``down_blocks.0.attentions.0.proj_in``) and by that path with ``_`` (kohya)."""

    def __init__(self, module: nnx.Module):
        self.kernels: dict[str, tuple[tuple, nnx.Variable]] = {}
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            if path[-1] == "kernel" and path[0] != "ip_adapters":   # adapters carry their own weights
                self.kernels[".".join(str(p) for p in path[:-1])] = (path, var)
        self.underscored: dict[str, str | None] = {}
        for name in self.kernels:
            key = name.replace(".", "_")
            self.underscored[key] = None if key in self.underscored else name   # None: ambiguous

    def find(self, layer: LoraLayer, fmt: str, blocks) -> str | None:
        name = layer.name
        if fmt == "peft":
            for candidate in (name, f"text_model.{name}"):   # transformers 5 saves CLIP without text_model.
                if candidate in self.kernels:
                    return candidate
            return None
        found = self.underscored.get(name)
        if found is None and layer.component == "unet":   # kohya's SDXL names: the sgm / LDM UNet's
            converted = _kohya_sgm_name(name, blocks)
            found = self.underscored.get(converted) if converted else None
        return found


def _torch_shape(shape: tuple) -> tuple:
    """A kernel's shape in torch layout: Linear [out, in], Conv [out, in, kh, kw]."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


def _delta(layer: LoraLayer, target: tuple, path: Path) -> np.ndarray:
    """``up @ down * alpha / rank`` in the target's torch layout (1x1 conv <-> linear
    reshaped), or an ``Incompatible`` naming the layer and both shapes. The
    pair's own shapes were checked when the file was read (``_check_shapes``)."""
    down, up = layer.down, layer.up
    delta = up.reshape(up.shape[0], layer.rank).astype(np.float64) @ down.reshape(layer.rank, -1).astype(np.float64)
    delta = (delta * layer.scaling()).reshape((up.shape[0],) + tuple(down.shape[1:]))
    if delta.shape != target and delta.shape[:2] == target[:2] and {delta.shape[2:], target[2:]} <= {(), (1, 1)}:
        delta = delta.reshape(target)   # a linear LoRA on a 1x1 conv (proj_in / proj_out) or the reverse
    if delta.shape != target:
        raise Incompatible(f"{path}: LoRA layer {layer.key!r} makes a {tuple(delta.shape)} update (up "
                           f"{tuple(up.shape)} @ down {tuple(down.shape)}) but the model's weight is {target} "
                           "(torch layout): a LoRA for another model or configuration")
    return delta.astype(np.float32)


# --------------------------------------------------------------------------- families

def _model_family(models: dict) -> str:
    unet = models.get("unet")
    xl = models.get("text_encoder_2") is not None or (
        unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time")
    return SDXL if xl else SD


def _file_family(lora: LoraFile) -> tuple[str | None, str]:
    """(family the file's names imply, why) or (None, "") when its names fit both."""
    keys = [layer.key for layer in lora.layers]
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return SDXL, "its text-encoder layers are lora_te1_* / lora_te2_*, SDXL's two text encoders"
    if any(layer.component == "text_encoder_2" for layer in lora.layers):
        return SDXL, "it has text_encoder_2 layers, SDXL's second text encoder"
    sgm = next((k for layer, k in zip(lora.layers, keys)
                if lora.format == "kohya" and layer.component == "unet" and _names_sgm_blocks(layer.name)), None)
    if sgm:
        return SDXL, f"its UNet layers have the sgm names of kohya's SDXL trainer ({sgm.split('.')[0]})"
    if any(k.startswith("lora_te_") for k in keys):
        return SD, "its text-encoder layers are lora_te_*, a single text encoder"
    return None, ""


def _context_width(lora: LoraFile) -> int | None:
    """The text-context width the file's cross-attention key / value layers read."""
    for layer in lora.layers:
        name = layer.name.replace(".", "_")
        if layer.component == "unet" and name.endswith(("attn2_to_k", "attn2_to_v")):
            return int(layer.down.shape[1])
    return None


def check_family(lora: LoraFile, models: dict) -> None:
    """Refuse a LoRA made for another base model (SDXL vs SD 1.x / 2.x), naming both."""
    model = _model_family(models)
    unet = models.get("unet")
    widths = set(unet.config.per_block("cross_attention_dim")) if unet is not None else set()
    model_why = ("two text encoders" if model == SDXL else "one text encoder") + \
        (f", cross-attention width {'/'.join(map(str, sorted(widths)))}" if widths else "")
    family, why = _file_family(lora)
    if family is not None and family != model:
        raise Incompatible(f"{lora.path} is an {family} LoRA ({why}); this model is {model} ({model_why})")
    width = _context_width(lora)
    if width is not None and widths and width not in widths:
        made_for = _CONTEXT_FAMILIES.get(width, f"a model with a {width}-wide text context")
        raise Incompatible(f"{lora.path} is a LoRA for {made_for} (its cross-attention reads a {width}-wide text "
                           f"context); this model is {model} ({model_why})")


# --------------------------------------------------------------------------- merging

def _plan(lora: LoraFile, models: dict, *, lenient: bool) -> tuple[list, list[str]]:
    """Every (component, module, state path, variable, delta) the file adds, or an
    error; ``lenient`` turns "the model lacks this layer" into a skip."""
    targets = {c: _Targets(m) for c, m in models.items() if m is not None}
    unet = models.get("unet")
    blocks = unet_blocks(unet.config) if unet is not None else {}
    plan, missing, errors = [], [], []
    for layer in lora.layers:
        found = targets[layer.component].find(layer, lora.format, blocks) if layer.component in targets else None
        if found is None:
            missing.append(layer.key)
            continue
        state_path, var = targets[layer.component].kernels[found]
        try:
            delta = _delta(layer, _torch_shape(var.get_value().shape), lora.path)
        except Incompatible as e:
            errors.append(e)
            continue
        plan.append((layer.component, found, state_path, var, delta))
    if errors:
        more = f" (and {len(errors) - 1} more layers that do not fit)" if len(errors) > 1 else ""
        raise Incompatible(f"{errors[0]}{more}")
    if missing and not lenient:
        shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise Incompatible(f"{lora.path}: {len(missing)} LoRA layers name modules this model lacks: {shown} "
                           "(a LoRA for another model or configuration? lenient=True / --lora-lenient skips "
                           "them and reports them)")
    return plan, missing


def apply_lora_to_models(models: dict, path: str | os.PathLike, scale: float = 1.0, *,
                         lenient: bool = False) -> LoraReport:
    """Merge a LoRA file into ``models`` (``{"unet": ..., "text_encoder": ...,
    "text_encoder_2": ...}``, None for absent ones) in place, with strength ``scale``."""
    require_finite("LoRA scale", scale)
    lora = read_lora(path)
    unknown = set(models) - set(COMPONENTS)
    if unknown:
        raise BadArgument(f"unknown model components {sorted(unknown)}; expected some of {COMPONENTS}")
    check_family(lora, models)
    plan, missing = _plan(lora, models, lenient=lenient)
    report = LoraReport(str(lora.path), lora.format, float(scale), skipped=missing)
    for component, module, state_path, var, delta in plan:
        value = var.get_value()
        var.set_value((value.astype(jnp.float32) +
                       jnp.asarray(to_flax_layout(state_path, delta * np.float32(scale)))).astype(value.dtype))
        report.applied.setdefault(component, []).append(module)
    return report


def apply_lora(pipe, path: str | os.PathLike, scale: float = 1.0, *, lenient: bool = False) -> LoraReport:
    """Merge a LoRA file (kohya or diffusers / PEFT) into a loaded pipeline's
    UNet and text encoder(s) (``pipe.unet``, ``pipe.text_encoder``, and
    ``pipe.text_encoder_2`` for SDXL), once: sampling costs nothing more.
    Call it once per file for several LoRAs, each with its own ``scale``.

    Raises ``Incompatible`` naming the layers for a layer the model lacks (with
    ``lenient=True`` they are skipped and listed in the report's ``skipped``),
    a rank / shape that does not fit, or a LoRA for another base model; nothing
    is changed then. Returns a ``LoraReport``."""
    return apply_lora_to_models({c: getattr(pipe, c, None) for c in COMPONENTS}, path, scale, lenient=lenient)


def apply_loras(pipe, specs: Sequence[str], *, lenient: bool = False) -> list[LoraReport]:
    """``apply_lora`` for each ``FILE[:SCALE]`` spec (sample.py's ``--lora``; FILE a
    path or a hub id ``org/name:file``), in order."""
    return [apply_lora(pipe, resolve(str(path), kind="file", what="LoRA file", flag="--lora"), scale,
                       lenient=lenient) for path, scale in map(parse_lora_spec, specs)]
