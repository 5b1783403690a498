"""Diffusion schedulers as pure JAX functions, numerically matching diffusers
(``core``: DDIM, PNDM, Euler, Euler-a, DPM++ 2M (Karras), the DDPM training
noise; see its docstring).

``NAMES`` is importable without JAX (the command lines check ``--scheduler``
before JAX loads); every other name is ``core``'s, imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib

NAMES = ("ddim", "pndm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras")


def __getattr__(name: str):
    value = getattr(importlib.import_module("ipadapter_jax.schedulers.core"), name)
    globals()[name] = value
    return value
