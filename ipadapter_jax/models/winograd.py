"""Winograd minimal-filtering convolution F(m x m, 3 x 3) over NHWC, stride 1.

The output is cut into m x m tiles; each reads an (m + 2) x (m + 2) input tile.
With the fixed matrices B, G, A of F(m, 3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2015; built here from their interpolation points):

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, per channel pair)

summed over input channels, which turns the elementwise product into (m + 2)^2
independent matmuls [tiles, C_in] x [C_in, C_out]. Multiply-adds per output
pixel drop from 9 C_in C_out to (m + 2)^2 / m^2 C_in C_out: 2.25x fewer for
F(2x2), 4x for F(4x4). The transforms are sums of shifted, strided slices of
the input with constant coefficients (no gather), so XLA fuses them into a
few memory passes; everything is plain JAX, so gradients follow by autodiff.

Rounding: F(2x2) has coefficients 0, +-1, +-1/2 and is about as accurate as a
direct convolution; F(4x4)'s wider coefficients (up to 8 and 1/15) cost more
float32 rounding, about 3x XLA's convolution's (measured in tests/test_winograd.py
and BENCHMARKS.md).
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _polymul(a: list, b: list) -> list:
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def cook_toom(points, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(m, r), m = len(points) + 2 - r, from the finite interpolation
    ``points`` plus the point at infinity, in exact rational arithmetic.

    Correlation is the transpose of polynomial multiplication, which Toom-Cook
    computes by evaluating at the points (G, A^T: Vandermonde rows p^k) and
    interpolating back (B^T = V^-T: the Lagrange numerators prod_{l != j}(x - p_l),
    whose denominators are moved into G, and for infinity prod_l (x - p_l))."""
    pts = [Fraction(p) for p in points]
    m = len(pts) + 2 - r
    bt, g = [], []
    for j, p in enumerate(pts):
        numerator, denominator = [Fraction(1)], Fraction(1)
        for q in pts[:j] + pts[j + 1:]:
            numerator, denominator = _polymul(numerator, [-q, Fraction(1)]), denominator * (p - q)
        sign = 1 if denominator > 0 else -1
        bt.append([sign * c for c in numerator] + [Fraction(0)])
        g.append([p ** k / abs(denominator) for k in range(r)])
    at_infinity = [Fraction(1)]
    for q in pts:
        at_infinity = _polymul(at_infinity, [-q, Fraction(1)])
    bt.append(at_infinity)
    g.append([Fraction(0)] * (r - 1) + [Fraction(1)])
    at = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    return tuple(np.array(mat, dtype=np.float64) for mat in (bt, g, at))


# Interpolation points per output tile size m. F(2x2): Lavin & Gray's 0, 1, -1. F(4x4): 0, +-1,
# 1/2, -2 instead of their 0, +-1, +-2, which rounds less in float32 (2.3e-6 against 3.6e-6
# relative for a 320-channel convolution, measured; Barabasz et al., "Error analysis and
# improving the accuracy of Winograd convolution", 2020, on the choice of points).
POINTS = {2: (0, 1, -1), 4: (0, 1, -1, Fraction(1, 2), -2)}
MATRICES = {m: cook_toom(points) for m, points in POINTS.items()}
TILES = tuple(MATRICES)


def transform_kernel(kernel: jax.Array, tile: int, zero: jax.Array | None = None) -> jax.Array:
    """HWIO 3x3 kernel [3, 3, C_in, C_out] -> G g G^T as [(m + 2)^2, C_in, C_out].

    Inside a jitted function whose kernel is an argument this runs on every call: a
    memory pass writing (m + 2)^2 / 9 times the kernel, cheap at 320 channels, a large
    share at 1280 (BENCHMARKS.md, "3x3 convolutions on CPU"); a long enough denoising loop
    runs it once before its steps, within a memory budget (``ipadapter_jax.models.hoisting``).
    ``zero``, an exact scalar 0 computed from other data, is added to the small
    transform matrix: the result then depends on that data (see ``conv``)."""
    # One [a*a, 9] x [9, C_in * C_out] matmul: as fast as writing u at all (measured),
    # where an einsum over the length-3 axes was 5-50x slower in XLA:CPU.
    gg = jnp.asarray(np.kron(MATRICES[tile][1], MATRICES[tile][1]), kernel.dtype)
    if zero is not None:
        gg = gg + zero.astype(gg.dtype)
    u = jnp.dot(gg, kernel.reshape(9, -1), precision=lax.Precision.HIGHEST)
    return u.reshape(-1, *kernel.shape[2:])


def _combine(slices: list[jax.Array], matrix: np.ndarray, axis: int) -> jax.Array:
    """Stack over rows k of ``matrix``: sum_j matrix[k, j] * slices[j] (zeros skipped,
    +-1 without a multiply), as the new axis ``axis``."""
    rows = []
    for coefficients in matrix:
        total = None
        for c, s in zip(coefficients, slices):
            if c == 0:
                continue
            term = s if c == 1 else -s if c == -1 else s * jnp.asarray(c, s.dtype)
            total = term if total is None else total + term
        rows.append(total)
    return jnp.stack(rows, axis=axis)


def _input_tiles(x: jax.Array, bt: np.ndarray, tile: int, tiles_h: int, tiles_w: int) -> jax.Array:
    """Padded NHWC input -> B^T d B for every tile: [a, a, N, tiles_h, tiles_w, C]."""
    a = bt.shape[0]
    rows = [lax.slice_in_dim(x, j, j + (tiles_h - 1) * tile + 1, stride=tile, axis=1) for j in range(a)]
    v = _combine(rows, bt, axis=0)                                  # [a, N, th, W, C]
    cols = [lax.slice_in_dim(v, j, j + (tiles_w - 1) * tile + 1, stride=tile, axis=3) for j in range(a)]
    return _combine(cols, bt, axis=1)                               # [a, a, N, th, tw, C]


def _output_tiles(m: jax.Array, at: np.ndarray) -> jax.Array:
    """[a, a, N, th, tw, C] products -> A^T M A: [N, th * tile, tw * tile, C]."""
    y = _combine(list(m), at, axis=0)                               # [t, a, N, th, tw, C]
    y = _combine([y[:, j] for j in range(y.shape[1])], at, axis=1)  # [t, t, N, th, tw, C]
    t, _, n, th, tw, c = y.shape
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * t, tw * t, c)


def conv3x3(x: jax.Array, u: jax.Array, *, tile: int, padding) -> jax.Array:
    """Stride-1 3x3 cross-correlation of NHWC ``x`` (as ``lax.conv_general_dilated``
    with HWIO kernels) given the transformed kernel ``u = transform_kernel(kernel, tile)``.

    ``padding`` is ((top, bottom), (left, right)); any map size works (the last
    tiles are zero-padded and their surplus outputs cut off)."""
    (pt, pb), (pl, pr) = padding
    bt, _, at = MATRICES[tile]
    a = tile + 2
    n, h, w, _ = x.shape
    out_h, out_w = h + pt + pb - 2, w + pl + pr - 2
    tiles_h, tiles_w = -(-out_h // tile), -(-out_w // tile)
    # Extra zeros bottom/right so that the last tile is whole.
    x = jnp.pad(x, ((0, 0), (pt, pb + tiles_h * tile - out_h), (pl, pr + tiles_w * tile - out_w), (0, 0)))
    v = _input_tiles(x, bt, tile, tiles_h, tiles_w)
    v = v.reshape(a * a, n * tiles_h * tiles_w, -1)
    prod = lax.dot_general(v, u.astype(v.dtype), (((2,), (1,)), ((0,), (0,))))   # [a*a, T, C_out]
    y = _output_tiles(prod.reshape(a, a, n, tiles_h, tiles_w, -1), at)
    return y[:, :out_h, :out_w]


def conv(x: jax.Array, kernel: jax.Array, *, tile: int = 2, padding=((1, 1), (1, 1))) -> jax.Array:
    """Stride-1 3x3 convolution of NHWC ``x`` with an HWIO ``kernel``, by Winograd F(tile, 3)."""
    return conv3x3(x, transform_kernel(kernel, tile, tied_zero(x, kernel.dtype)), tile=tile, padding=padding)


def tied_zero(x: jax.Array, dtype) -> jax.Array:
    """An exact scalar 0 computed from ``x``, for ``transform_kernel(..., zero)``.

    It makes the transformed kernel depend on x, so that it is computed where the
    convolution runs. Depending on the parameters only, XLA:CPU computes every layer's
    transformed kernel at the start of the program and keeps them all live: the SD1.5
    UNet's temporary memory went from 0.25 to 2.6 GiB (0.44 with this); it also dropped
    lax.optimization_barrier. 0 * (x0 != x0): no NaN from x, no gradient. Added to the
    kernel itself it cost a pass over every kernel. (A long enough denoising loop
    computes the transforms once before its steps instead, see ``ipadapter_jax.models.hoisting``.)"""
    x0 = x[(0,) * x.ndim]
    return jnp.zeros((), dtype) * (x0 != x0).astype(dtype)
