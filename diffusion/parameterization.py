"""v-prediction (Salimans & Ho 2022, ref. [26]) and its conversions, for z = alpha*x + sigma*eps.

    v = alpha*eps - sigma*x,  x = alpha*z - sigma*v,  eps = sigma*z + alpha*v

All functions take alpha and sigma already broadcast to the image shape.
"""

from __future__ import annotations

from torch import Tensor


def diffuse(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The forward process marginal q(z_t | x) (paper eq. 1)."""
    return alpha * x + sigma * eps


def v_target(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x


def x_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * z - sigma * v


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * z + alpha * v
