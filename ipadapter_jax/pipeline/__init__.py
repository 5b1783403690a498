"""Pipelines: prompts in, images out. One idea per file:

* ``stable_diffusion`` ``StableDiffusionPipeline``: prepare -> denoise -> decode;
* ``stable_diffusion_xl`` ``StableDiffusionXLPipeline``: the same with SDXL's text stage;
* ``auto``             ``load_pipeline``: the class a folder's ``model_index.json`` names;
* ``single_file``      ``load_pipeline_from_single_file``: a pipeline from one LDM-layout checkpoint;
* ``prompts``          ``ImagePromptSpec`` -> the UNet's ``ImagePrompt`` arrays and gates;
* ``denoise``          the jitted ``fori_loop`` and its one compile cache;
* ``control``          ``ControlNetSpec``: ControlNet residuals inside the loop;
* ``inputs``           masks and img2img images, prepared as diffusers does;
* ``jitted``           frozen modules behind one jitted function; the ``data`` mesh.
"""

from ipadapter_jax.pipeline.control import ControlNetSpec
from ipadapter_jax.pipeline.denoise import CompiledLoops, guide, make_denoise_loop
from ipadapter_jax.pipeline.jitted import JittedModule, data_mesh, shard_batch
from ipadapter_jax.pipeline.prompts import ImagePromptSpec, build_image_prompts
from ipadapter_jax.pipeline.stable_diffusion import Prepared, SampleOutput, StableDiffusionPipeline
from ipadapter_jax.pipeline.stable_diffusion_xl import StableDiffusionXLPipeline
from ipadapter_jax.pipeline.auto import load_pipeline, pipeline_class
from ipadapter_jax.pipeline.single_file import load_pipeline_from_single_file

__all__ = ["CompiledLoops", "ControlNetSpec", "ImagePromptSpec", "JittedModule", "Prepared", "SampleOutput",
           "StableDiffusionPipeline", "StableDiffusionXLPipeline", "build_image_prompts", "data_mesh", "guide",
           "load_pipeline", "load_pipeline_from_single_file", "make_denoise_loop", "pipeline_class",
           "shard_batch"]
