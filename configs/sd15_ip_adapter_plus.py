"""IP-Adapter Plus (Resampler over CLIP hidden_states[-2]) on SD 1.5."""

from configs import sd15_ip_adapter


def get_config(arg: str | None = None):
    c = sd15_ip_adapter.get_config(arg)
    c.workdir = "runs/sd15_ip_adapter_plus"
    c.model.variant = "plus"
    c.model.num_tokens = 16
    return c
