"""Flax NNX models whose module trees mirror diffusers/transformers."""

from ipadapter_jax.models.clip import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTextOutput,
                                       CLIPVisionModelWithProjection, CLIPVisionOutput)
from ipadapter_jax.models.conditioning import ImagePrompt, UNetConditioning
from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel
from ipadapter_jax.models.unet import UNet2DConditionModel, UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTextOutput",
           "CLIPVisionModelWithProjection", "CLIPVisionOutput", "ControlNetConfig", "ControlNetModel",
           "DiagonalGaussian", "ImagePrompt", "UNet2DConditionModel", "UNetConditioning", "UNetConfig", "VAEConfig"]
