"""The base-model families (``ipadapter_jax.families``): each record agrees with
its own standard configuration, detection finds each family from its configs,
the command lines and the package root load no JAX, and no code outside the
families' own files tests for a family by name."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from ipadapter_jax import families
from ipadapter_jax.families import FAMILIES, UNET_FAMILIES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ipadapter_jax"


def test_the_families():
    assert list(FAMILIES) == ["sd1", "sd2", "sdxl", "flux"]
    assert [f.name for f in UNET_FAMILIES] == ["sd1", "sd2", "sdxl"]


@pytest.mark.parametrize("name", [f.name for f in UNET_FAMILIES])
def test_record_agrees_with_its_configs(name):
    family = FAMILIES[name]
    unet = family.configs["unet"]
    assert family.token_dim == unet["cross_attention_dim"]
    assert family.default_size == unet["sample_size"] * 8
    assert family.added_conditioning == unet.get("addition_embed_type")
    assert family.configs["model_index"]["_class_name"] in family.pipeline_classes
    assert [s.component for s in family.text] == [c for c in ("text_encoder", "text_encoder_2")
                                                   if c in family.configs]
    for slot in family.text:
        assert slot.model_class in family.configs[slot.component]["architectures"]
        assert family.configs["model_index"][slot.component][1] == slot.model_class
    assert set(family.components) >= {"unet", "vae", *family.tokenizers}
    # Detection finds the family from its own configs, a UNet config, and its token width.
    assert families.of_configs(family.configs) is family
    assert families.of_unet_config(unet) is family
    assert families.of_token_dim(family.token_dim) is family
    assert family.text_conditioning in families_text().TEXT_CONDITIONING
    assert family.comfy.counts in {f.comfy.counts for f in UNET_FAMILIES}


def test_flux_record_agrees_with_its_configs():
    """The DiT family: a transformer instead of a UNet, T5 tokens + CLIP pooled text, flow targets."""
    from ipadapter_jax.models.flux import FluxConfig
    from ipadapter_jax.models.t5 import T5Config
    from ipadapter_jax.schedulers.flow_match import FlowMatchEuler

    flux = FAMILIES["flux"]
    transformer = flux.configs["transformer"]
    assert flux.denoiser == "transformer" and flux.comfy is None and flux.prediction_type == "flow"
    assert flux.token_dim == transformer["joint_attention_dim"] == flux.configs["text_encoder_2"]["d_model"]
    assert transformer["pooled_projection_dim"] == flux.configs["text_encoder"]["hidden_size"]
    assert flux.default_size == 1024
    assert set(flux.components) == {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                    "tokenizer_2"}
    for slot in flux.text:
        assert slot.model_class in flux.configs[slot.component]["architectures"]
        assert flux.configs["model_index"][slot.component][1] == slot.model_class
    assert flux.configs["model_index"]["_class_name"] in flux.pipeline_classes
    assert families.of_configs(flux.configs) is flux
    assert flux.text_conditioning in families_text().TEXT_CONDITIONING
    # The standard configs parse: the models and the scheduler take them as they are.
    assert FluxConfig.from_dict(transformer).inner_dim == 3072
    assert T5Config.from_dict(flux.configs["text_encoder_2"]).gated
    assert FlowMatchEuler(flux.configs["scheduler"]).config["use_dynamic_shifting"]


def families_text():
    from ipadapter_jax.families import text

    return text


def test_of_folder_refuses_other_pipelines(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(families.Unsupported, match="KandinskyPipeline folder"):
        families.of_folder(tmp_path)
    with pytest.raises(families.MissingFile, match="model folder not found"):
        families.of_folder(tmp_path / "nope")


@pytest.mark.parametrize("module", ["ipadapter_jax", "ipadapter_jax.families", "ipadapter_jax.cli.sample",
                                    "ipadapter_jax.io.hub", "ipadapter_jax.schedulers"])
def test_imports_load_no_jax(module):
    """The package root, the families and the command lines' argument checks load
    no JAX (PEP 562 lazy names), so --help and bad flags answer at once."""
    code = f"import sys, {module}; print(sorted(m for m in ('jax', 'flax', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", (module, out.stdout, out.stderr[-2000:])


def test_root_names_still_import():
    import ipadapter_jax

    from ipadapter_jax import CheckpointError, UNet2DConditionModel   # noqa: F401 (the lazy names resolve)

    assert set(ipadapter_jax.__all__) >= {"AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection",
                                          "CLIPVisionModelWithProjection", "UNet2DConditionModel",
                                          "CheckpointError", "__version__"}


# --------------------------------------------------------------------------- family names stay in their files

# Identifiers that name a family (SD 1.x / 1.5, SD 2.x, SDXL), and quoted family keys.
FAMILY_NAME = re.compile(r"sdxl|(?<![a-z])xl(?![a-z])|_xl(?![a-z])|sd_?1(5)?(?!\d)|sd_?2(?!\d)|"
                         r"StableDiffusionXL|text_time", re.IGNORECASE)
FAMILY_KEY = re.compile(r"""^[rbuf]*['"](sd1|sd2|sdxl)['"]$""")
# The files that may name a family in their code, and why.
ALLOWED = {
    "families/__init__.py": "the records",
    "families/configs.py": "the records' standard configurations",
    "pipeline/stable_diffusion_xl.py": "SDXL's own pipeline (its second text encoder and micro-conditioning)",
    "pipeline/__init__.py": "exports SDXL's pipeline class",
    "pipeline/single_file.py": "the table of pipeline classes that Family.pipeline names",
    "convert/lora.py": "key maps: kohya's SDXL names (lora_te1_/lora_te2_, sgm UNet paths)",
    "convert/textual_inversion.py": "key maps: SDXL embedding files (clip_l / clip_g)",
    "convert/controlnet.py": "SD 1.5's ControlNet configuration, the original-layout files' default",
    "demo/recipe.py": "the demo model is an SD 1.5-architecture miniature (its scheduler config)",
}


def family_names_in_code(path: Path) -> list[tuple[int, str]]:
    """(line, token) of identifiers and quoted keys naming a family, outside comments and docstrings."""
    import ast

    text = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and FAMILY_NAME.search(tok.string):
            found.append((tok.start[0], tok.string))
        elif tok.type == tokenize.STRING and tok.start[0] not in docstrings and FAMILY_KEY.match(tok.string):
            found.append((tok.start[0], tok.string))
    return found


def test_family_names_stay_in_the_families_files():
    """Code elsewhere asks the family record; it does not test for a family by name."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("demo/model/") or rel in ALLOWED:
            continue
        found = family_names_in_code(path)
        if found:
            offenders[rel] = found[:5]
    assert not offenders, ("package files naming a base-model family in their code (ask ipadapter_jax.families, "
                           f"or add the file to ALLOWED with the reason): {offenders}")
    assert len(ALLOWED) <= 9


def test_the_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""sdxl in a docstring is fine."""\n# so is SDXL in a comment\n'
                   'def f(family):\n    return family.name == "sdxl" or is_sdxl(family)\n')
    assert [name for _, name in family_names_in_code(bad)] == ['"sdxl"', "is_sdxl"]


def test_adapter_files_are_told_apart_by_their_keys():
    """SD (h94) adapters, FaceID ones included (their projection has a norm, like InstantX's), against
    FLUX ones (XLabs' names, diffusers' naming of them with biases, InstantX's image keys from block 0)."""
    faceid = ["image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.norm.weight",
              "ip_adapter.0.to_q_lora.down.weight", "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight"]
    instantx = ["image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.norm.weight",
                "ip_adapter.0.to_k_ip.weight", "ip_adapter.0.to_v_ip.weight"]
    cases = {"unet": [["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"], faceid],
             "transformer": [["ip_adapter_proj_model.proj.weight", "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"],
                             ["image_proj.proj.weight", "ip_adapter.0.to_k_ip.weight", "ip_adapter.0.to_k_ip.bias"],
                             instantx]}
    for expected, key_sets in cases.items():
        for keys in key_sets:
            assert families.adapter_denoiser(keys) == expected, keys
    assert families.adapter_denoiser(["unet.conv_in.weight"]) is None
