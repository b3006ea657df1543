"""The 49 orthonormal 7x7 DCT-II bases of DAM's frequency branch (docs/hdf_method.md §R3)."""

from __future__ import annotations

import math

import torch

DCT_SIZE = 7
DCT_NUM = DCT_SIZE * DCT_SIZE


def dct_bank(size: int = DCT_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The size^2 x size x size orthonormal 2-D DCT-II bases, k = size*u + v (§R3).

    B_k(i, j) = c(u) c(v) cos(pi (2i+1) v / 2n) cos(pi (2j+1) u / 2n), c(0) = sqrt(1/n),
    c(>0) = sqrt(2/n): the `DCT7x7` filter of FSTA-SNN that the released HDF code imports but
    does not ship (docs/hdf_method.md §R3), here built on any device from a formula.
    """
    n = int(size)
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    pos = torch.arange(n, dtype=torch.float64)
    freq = torch.arange(n, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    # basis1d[f, p] = c(f) cos(pi (2p+1) f / 2n): row f is the 1-D DCT-II basis of frequency f.
    basis1d = scale[:, None] * torch.cos(math.pi * (2 * pos[None, :] + 1) * freq[:, None] / (2 * n))
    # bank[u, v, i, j] = basis1d[v, i] * basis1d[u, j]
    bank = torch.einsum("vi,uj->uvij", basis1d, basis1d)
    return bank.reshape(n * n, n, n).to(dtype)
