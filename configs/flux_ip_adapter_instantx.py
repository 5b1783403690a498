"""A FLUX IP-Adapter in InstantX's layout: SigLIP so400m pooler_output -> MLP -> 128 tokens, image keys and
values in all 57 blocks (configs/flux_ip_adapter.py for everything else).

    python train.py --config configs/flux_ip_adapter_instantx.py \\
        --config.model.pretrained=black-forest-labs/FLUX.1-dev \\
        --config.model.image_encoder=google/siglip-so400m-patch14-384 \\
        --config.data.json_file=data.json --config.data.image_root=images/ --config.mesh.fsdp=8
"""

from configs import flux_ip_adapter


def get_config(arg: str | None = None):
    c = flux_ip_adapter.get_config(arg)
    c.workdir = "runs/flux_ip_adapter_instantx"
    c.model.layout = "instantx"
    c.model.num_tokens = 128
    return c
