"""``from_pretrained`` / ``save_pretrained`` for model folders, shared by every model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from flax import nnx

from ipadapter_jax.io.files import find_weights, load_config, read_weights, save_safetensors
from ipadapter_jax.io.params import LoadReport, Rename, load_state_dict_into, module_state_dict


def load_pretrained(folder: str | os.PathLike, build: Callable[[dict], nnx.Module], *, weights_name: str,
                    variant: str | None = None, strict: bool = True, rename: Rename | None = None,
                    check_config: Callable[[dict], object] | None = None,
                    ) -> tuple[nnx.Module, LoadReport]:
    """Read ``folder/config.json`` and the folder's weights into ``build(config)``.

    ``build`` must construct the module from the config dict (it is traced
    abstractly first, so building is cheap). ``check_config`` runs before any
    weights are read, so a bad config fails fast. Errors name the folder/file/key.
    """
    folder = Path(folder)
    config = load_config(folder)
    if check_config is not None:
        check_config(config)
    files = find_weights(folder, weights_name, variant)
    state_dict = read_weights(files)
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return load_state_dict_into(lambda: build(config), state_dict, source=source, strict=strict,
                                rename=rename)


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
                        return_report: bool = False, **options):
        """Load a diffusers/transformers model folder (``config.json`` plus
        ``*.safetensors`` or ``*.bin``; ``variant="fp16"`` picks
        ``*.fp16.safetensors``). ``options`` (``dtype``, ``attention_backend``)
        go to the constructor. Strict by default: see ``load_state_dict_into``.
        With ``return_report=True`` returns ``(module, LoadReport)``."""

        def build(config):
            module = cls.from_config(config, rngs=nnx.Rngs(0), **options)
            module.config_json = json.dumps(config, sort_keys=True)
            return module

        module, report = load_pretrained(folder, build, weights_name=cls.weights_name, variant=variant,
                                         strict=strict, rename=cls.rename_key,
                                         check_config=cls.parse_config)
        return (module, report) if return_report else module

    @property
    def config_dict(self) -> dict:
        return json.loads(self.config_json)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the folder back in torch layout (diffusers/transformers load it)."""
        return save_pretrained(self, folder, config=self.config_dict, weights_name=self.weights_name)
