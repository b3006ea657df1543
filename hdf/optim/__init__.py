"""SAM around a base optimizer and the warm-up + cosine schedule (docs/hdf_method.md §R5)."""

from hdf.optim.sam import SAM
from hdf.optim.schedule import cosine_with_warmup

__all__ = ["SAM", "cosine_with_warmup"]
