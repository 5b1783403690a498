"""Compatibility name: official IP-Adapter files are read and written by
``ipadapter_jax.ip_adapter.official``; this module re-exports it."""

from ipadapter_jax.ip_adapter.official import (ip_adapter_state_dict, load_ip_adapter,  # noqa: F401
                                               read_ip_adapter, save_ip_adapter)
from ipadapter_jax.ip_adapter.variants import detect  # noqa: F401
