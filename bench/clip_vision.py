"""CLIP vision encode (the IP-Adapter image encoder), JAX vs transformers, same weights, same machine, one run.

    python bench/clip_vision.py                    # OpenCLIP ViT-H/14 (SD1.5 IP-Adapter's encoder), batch 1, fp32
    python bench/clip_vision.py --batch 8 --device cuda --dtype bfloat16 --torch-dtype float16

Times the projected image embedding (what the base adapter reads) and the penultimate hidden states (what
Plus reads) of 224 px preprocessed images. Compile time is reported apart from the median of ``--runs``
timed calls; ratio = JAX time / PyTorch time (< 1: JAX faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import jax_vs_torch, report, torch_inference  # noqa: E402

# The image encoder config IP-Adapter ships for SD1.5 (models/image_encoder/config.json): OpenCLIP ViT-H/14.
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
DTYPES = ("float32", "bfloat16", "float16")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per framework (median reported)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="JAX compute dtype")
    parser.add_argument("--torch-dtype", choices=DTYPES, default=None, help="torch dtype (default: --dtype)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    parser.add_argument("--attention", default="auto", help="JAX attention backend (auto, xla, blocked, jax, cudnn)")
    parser.add_argument("--skip-torch", action="store_true", help="time JAX only")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as TorchVision

    from ipadapter_jax.io import load_state_dict_into
    from ipadapter_jax.models import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(**VIT_H14)
    torch_model = TorchVision(config).eval()
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    jdtype = getattr(jnp, args.dtype)
    model, _ = load_state_dict_into(
        lambda: CLIPVisionModelWithProjection(config.to_dict(), dtype=jdtype, attention_backend=args.attention,
                                              rngs=nnx.Rngs(0)),
        state, rename=CLIPVisionModelWithProjection.rename_key)
    graphdef, params = nnx.split(model)

    @jax.jit
    def encode(p, pixels):
        out = nnx.merge(graphdef, p)(pixels)
        return out.image_embeds, out.hidden_states[-2]

    pixels = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    jpixels = jnp.asarray(pixels)
    tdtype = getattr(torch, args.torch_dtype or args.dtype)
    torch_model = torch_model.to(args.device, tdtype)
    tpixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(args.device, tdtype)

    def torch_encode():
        out = torch_model(pixel_values=tpixels, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]

    torch_encode = torch_inference(torch_encode, args.device)

    fields, jax_out, torch_out = jax_vs_torch(lambda: jax.block_until_ready(encode(params, jpixels)),
                                              torch_encode, args.runs, skip_torch=args.skip_torch)
    record = dict(model="clip-vit-h-14", batch=args.batch, image=224, dtype=args.dtype, attention=args.attention,
                  **fields)
    if torch_out is not None:
        t = torch_out[0].float().cpu().numpy()
        record.update(torch_device=args.device, torch_dtype=str(tdtype).replace("torch.", ""),
                      rel_diff=float(np.linalg.norm(np.asarray(jax_out[0], np.float32) - t) / np.linalg.norm(t)))
    report("clip_vision", record)


if __name__ == "__main__":
    main()
