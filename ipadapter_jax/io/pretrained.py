"""``from_pretrained`` / ``save_pretrained`` for model folders, shared by every model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from flax import nnx

from ipadapter_jax.io import hub
from ipadapter_jax.io.errors import BadFile, UserError
from ipadapter_jax.io.files import find_weights, load_config, read_weights, save_safetensors
from ipadapter_jax.io.params import AbstractRngs, LoadReport, Rename, load_state_dict_into, module_state_dict


def model_folder(folder: str | os.PathLike, *, weights_name: str, variant: str | None = None,
                 subfolder: str | None = None) -> Path:
    """``folder[/subfolder]`` as a local folder: a local path as given, a hub id
    (``org/name``, ``org/name:path``; see ``io.hub``) as its folder in the Hugging
    Face cache, fetching only the config and the weights that will be read."""
    spec = hub.join(folder, subfolder)
    if hub.is_hub_id(spec):
        return hub.resolve_model_folder(spec, weights_name=weights_name, variant=variant)
    return Path(spec)


def load_pretrained(folder: str | os.PathLike, build: Callable[..., nnx.Module], *, weights_name: str,
                    variant: str | None = None, strict: bool = True, rename: Rename | None = None,
                    check_config: Callable[[dict], object] | None = None, subfolder: str | None = None,
                    ) -> tuple[nnx.Module, LoadReport]:
    """Read ``folder/config.json`` and the folder's weights into ``build(config, rngs)``.

    ``folder`` may be a hub id and ``subfolder`` is joined onto it (``model_folder``).

    ``build`` must construct the module from the config dict with the given
    ``rngs``: it is traced abstractly first with ``AbstractRngs()`` (so
    building is cheap), and called with real ``nnx.Rngs(0)`` only for a
    non-strict load that leaves parameters to their init. ``check_config`` runs before any
    weights are read, so a bad config fails fast. Errors name the folder/file/key.
    """
    folder = model_folder(folder, weights_name=weights_name, variant=variant, subfolder=subfolder)
    config = load_config(folder)
    if check_config is not None:
        try:
            check_config(config)
        except UserError as e:   # the same error, naming the file
            try:
                named = type(e)(f"{folder / 'config.json'}: {e}")
            except TypeError:
                raise e from None
            raise named from None
    files = find_weights(folder, weights_name, variant)
    state_dict = read_weights(files, lazy=True)   # tensor by tensor: no second copy of the model
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return load_state_dict_into(lambda: build(config, nnx.Rngs(0)), state_dict, source=source, strict=strict,
                                rename=rename, make_abstract=lambda: build(config, AbstractRngs()))


# --------------------------------------------------------------------------- config values

_KIND_WORDS = {"int": "a positive integer", "int0": "an integer >= 0", "num": "a finite number",
               "pos": "a positive number", "bool": "true or false", "str": "a string"}


def _fits(value, kind: str) -> bool:
    if "|" in kind:
        return any(_fits(value, k) for k in kind.split("|"))
    if kind.endswith("?"):
        return value is None or _fits(value, kind[:-1])
    if kind.startswith("list[") and kind.endswith("]"):
        return (isinstance(value, (list, tuple)) and len(value) > 0
                and all(_fits(v, kind[5:-1]) for v in value))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind in ("int", "int0"):
        return isinstance(value, int) and value >= (1 if kind == "int" else 0)
    if kind == "num":
        return math.isfinite(value)
    if kind == "pos":
        return math.isfinite(value) and value > 0
    raise AssertionError(f"unknown config value kind {kind!r}")


_KIND_PLURALS = {"int": "positive integers", "int0": "integers >= 0", "num": "finite numbers",
                 "pos": "positive numbers", "bool": "booleans", "str": "strings"}


def _describe_kind(kind: str, plural: bool = False) -> str:
    if "|" in kind:
        return " or ".join(_describe_kind(k, plural) for k in kind.split("|"))
    if kind.endswith("?"):
        return _describe_kind(kind[:-1], plural) + (" or nulls" if plural else " or null")
    if kind.startswith("list["):
        return ("non-empty lists of " if plural else "a non-empty list of ") + _describe_kind(kind[5:-1], True)
    return _KIND_PLURALS[kind] if plural else _KIND_WORDS[kind]


def check_fields(cfg, fields: dict[str, str], source: str = "config", *, skip_none: bool = False) -> None:
    """Refuse config values of the wrong type or range, naming the key and what
    it must be, before anything is built from them.

    ``fields`` maps a key to its kind: ``int`` (>= 1), ``int0`` (>= 0), ``num``
    (finite), ``pos`` (finite, > 0), ``bool``, ``str``; ``K?`` also allows null,
    ``list[K]`` a non-empty list of K, ``A|B`` either. Keys missing from ``cfg``
    are not checked (the defaults apply); with ``skip_none`` neither are nulls.
    """
    if not isinstance(cfg, dict):
        raise BadFile(f"{source}: expected a JSON object of config values, got a {type(cfg).__name__}")
    for key, kind in fields.items():
        if key not in cfg or (skip_none and cfg[key] is None):
            continue
        if not _fits(cfg[key], kind):
            shown = repr(cfg[key])
            shown = shown if len(shown) <= 80 else shown[:80] + "..."
            raise BadFile(f"{source}: {key} must be {_describe_kind(kind)}, got {shown}")


def check_groups(channels, groups, source: str = "config", what: str = "block_out_channels") -> None:
    """GroupNorm needs every channel count divisible by its group count."""
    bad = [c for c in channels if c % groups]
    if bad:
        raise BadFile(f"{source}: norm_num_groups={groups} does not divide {what} {list(channels)} "
                      f"(group normalisation splits the channels into equal groups)")


def save_pretrained(module: nnx.Module, folder: str | os.PathLike, *, config: dict, weights_name: str) -> Path:
    """Write ``config.json`` and ``{weights_name}.safetensors`` in torch layout,
    loadable by diffusers/transformers ``from_pretrained`` and by this package."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return save_safetensors(module_state_dict(module), folder / f"{weights_name}.safetensors",
                            metadata={"format": "pt"})


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for a model class.

    A model sets ``weights_name`` (``diffusion_pytorch_model`` or ``model``),
    implements ``parse_config(config_dict)`` (returning the typed config its
    constructor takes, raising on values it cannot compute), and may override
    ``rename_key`` for legacy checkpoint names. The source config is
    kept as JSON text (hashable, so it can live on an NNX module as static data)
    so that ``save_pretrained`` writes back what was read.
    """

    weights_name: str = "model"
    config_json: str = "{}"

    @classmethod
    def parse_config(cls, config: dict):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, *, rngs: nnx.Rngs, **options):
        """Build a randomly initialised model from a config dict."""
        return cls(cls.parse_config(config), rngs=rngs, **options)

    @staticmethod
    def rename_key(key: str, value):
        return key, value

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, variant: str | None = None, strict: bool = True,
                        return_report: bool = False, subfolder: str | None = None, **options):
        """Load a diffusers/transformers model folder (``config.json`` plus
        ``*.safetensors`` or ``*.bin``; ``variant="fp16"`` picks
        ``*.fp16.safetensors``): a local path, or a Hugging Face hub id
        (``org/name``, ``org/name:unet``; fetched into the hub cache, see
        ``io.hub``), with diffusers' ``subfolder=`` joined onto either.
        ``options`` (``dtype``, ``attention_backend``) go to the constructor.
        Strict by default: see ``load_state_dict_into``. With
        ``return_report=True`` returns ``(module, LoadReport)``."""

        def build(config, rngs):
            module = cls.from_config(config, rngs=rngs, **options)
            module.config_json = json.dumps(config, sort_keys=True)
            return module

        module, report = load_pretrained(folder, build, weights_name=cls.weights_name, variant=variant,
                                         strict=strict, rename=cls.rename_key,
                                         check_config=cls.parse_config, subfolder=subfolder)
        return (module, report) if return_report else module

    @property
    def config_dict(self) -> dict:
        return json.loads(self.config_json)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the folder back in torch layout (diffusers/transformers load it)."""
        return save_pretrained(self, folder, config=self.config_dict, weights_name=self.weights_name)
