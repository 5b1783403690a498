"""The embedded demo: a procedural shapes dataset (``shapes``) and the
miniature SD + IP-Adapter trained on it with this package's own code
(``recipe``, ``configs/demo/``), shipped in ``model/`` in the standard layouts:

    model/sd/                          diffusers StableDiffusionPipeline folder
    model/image_encoder/               transformers CLIPVisionModelWithProjection
    model/clip/                        transformers CLIPModel (for CLIP-I / CLIP-T)
    model/ip-adapter_demo.safetensors  official IP-Adapter layout (base variant)
    model/reference.png                the default reference image of ``sample.py``
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_PROMPT = "a purple square on a yellow background"
DEFAULT_SCALE = 0.5     # caption and reference both show (CLIP-I per scale: BENCHMARKS.md, "Demo adapter scale")
# How the demo model samples by default (sample.py and the evaluation): its size is 64 px.
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_NUM_IMAGES = 25, 5.0, 64, 4


def demo_paths() -> dict[str, Path]:
    """Paths of the shipped demo files; a clear error when any is missing."""
    paths = {"sd": MODEL_DIR / "sd", "image_encoder": MODEL_DIR / "image_encoder", "clip": MODEL_DIR / "clip",
             "adapter": MODEL_DIR / "ip-adapter_demo.safetensors", "reference": MODEL_DIR / "reference.png"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the demo model is incomplete, missing: {', '.join(missing)}. It ships in the "
                                "repository; rebuild it with the recipe in configs/demo/__init__.py")
    return paths
