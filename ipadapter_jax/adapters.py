"""Compatibility name: the IP-Adapter's home is ``ipadapter_jax.ip_adapter``.

``from ipadapter_jax import adapters`` (as in earlier READMEs) keeps working:
this module re-exports the subpackage's public names.
"""

from ipadapter_jax.ip_adapter import *  # noqa: F401,F403
from ipadapter_jax.ip_adapter import __all__  # noqa: F401
