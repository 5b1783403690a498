"""Full-size parity figures without real weights: a random full-size pipeline
folder of a family (the official configs, torch's default initialisation,
seeded; a ViT-H/14 image encoder and a random base IP-Adapter in the official
layout), then ``ipadapter-parity`` on it as a user runs it. Prints the report
and writes its JSON; the JSON's ``run.peak_rss_gb`` is the command's peak
memory (one process: the reference pass, then ours).

    python bench/parity_full_size.py --family sd1 --size 512 --steps 4 --dtype bfloat16 \\
        --json bench/results/parity_sd15.json
    python bench/parity_full_size.py --family sdxl --size 512 --steps 3 --json bench/results/parity_sdxl.json

Real weights give other figures (trained weights have other statistics); README, "Checking parity on your
own files", quotes these and says so. The folder is built in --work (default: a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

# CLIP ViT-H/14 (IP-Adapter's models/image_encoder): the official transformers config's sizes.
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024, hidden_act="gelu")


def build(family: str, root: Path) -> dict:
    """The random full-size folder of ``family`` (sd1, sdxl), its image encoder and adapter."""
    import gc

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.numpy import save_file
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from ipadapter_jax.families.configs import SD1_CONFIGS, SDXL_CONFIGS
    from sampling import random_ip_adapter
    from sd_fixtures import write_tokenizer

    configs = {"sd1": SD1_CONFIGS, "sdxl": SDXL_CONFIGS}[family]
    torch.manual_seed(0)
    sd = root / family
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}   # noqa: E731
    unet = UNet2DConditionModel(**strip(configs["unet"]))
    unet.save_pretrained(sd / "unet")
    adapter = root / "ip-adapter.safetensors"
    save_file(random_ip_adapter(unet, VIT_H["projection_dim"]), adapter)
    del unet
    gc.collect()
    AutoencoderKL(**strip(configs["vae"])).save_pretrained(sd / "vae")
    for slot, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if slot not in configs:
            continue
        vocab = write_tokenizer(sd / slot.replace("text_encoder", "tokenizer"))
        fields = {k: v for k, v in configs[slot].items() if k not in ("architectures", "model_type")}
        fields.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        cls(CLIPTextConfig(**fields)).save_pretrained(sd / slot)
        gc.collect()
    scheduler = dict(configs["scheduler"])
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (sd / "model_index.json").write_text(json.dumps(configs["model_index"]))
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).save_pretrained(root / "image_encoder")
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(root / "ref.png")
    return {"model": sd, "image_encoder": root / "image_encoder", "adapter": adapter, "image": root / "ref.png"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    p.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--components", default=None)
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default=None)
    p.add_argument("--work", default=None, help="build (or reuse) the folder here instead of a temporary one")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        t0 = time.perf_counter()
        marker = root / "built.json"
        if marker.is_file():
            paths = {k: Path(v) for k, v in json.loads(marker.read_text()).items()}
        else:
            root.mkdir(parents=True, exist_ok=True)
            paths = build(args.family, root)
            marker.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
        print(f"folder ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cmd = [sys.executable, "-m", "ipadapter_jax.parity", "--model", str(paths["model"]), "--image-encoder",
               str(paths["image_encoder"]), "--ip-adapter", str(paths["adapter"]), "--image", str(paths["image"]),
               "--prompt", "a photo of a cat", "--scale", "0.6", "--height", str(args.size), "--width",
               str(args.size), "--steps", str(args.steps), "--dtype", args.dtype, "--json", args.json,
               "--no-progress"] + (["--components", args.components] if args.components else []) + \
              (["--plot", args.plot] if args.plot else [])
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        print(f"ipadapter-parity exit {rc} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
