"""The embedded demo's recipe, one command per stage (run from the repository root):

    python train.py --config configs/demo/clip.py               # tiny CLIP, contrastive
    python train.py --config configs/demo/vae.py                # tiny AutoencoderKL
    python train.py --config configs/demo/unet.py               # tiny text-to-image UNet -> sd/
    python train.py --config configs/demo/ip_adapter.py         # IP-Adapter (base), everything else frozen
    python train.py --config configs/demo/ip_adapter_simple.py  # ablation: the paper's "simple adapter"

Each stage writes into ``demo.root`` (default: the shipped ``ipadapter_jax/demo/model``, so rerunning
the recipe regenerates the shipped files) and resumes from its checkpoints in ``runs/demo/<stage>``.
The shapes dataset is rendered once into ``runs/demo/tfds`` (TFDS, array_record) by the first stage.
"""
