"""Losses: DSM, the Distribution-aware Scaling Module of HDF (paper Sec. 4)."""

from hdf.losses.dsm import DSMLoss, ib_trace, weighted_supcon

__all__ = ["DSMLoss", "ib_trace", "weighted_supcon"]
