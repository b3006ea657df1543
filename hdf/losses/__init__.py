"""Losses: DSM, the Distribution-aware Scaling Module of HDF (docs/hdf_method.md)."""

from hdf.losses.dsm import DSMLoss, ib_trace, weighted_supcon

__all__ = ["DSMLoss", "ib_trace", "weighted_supcon"]
