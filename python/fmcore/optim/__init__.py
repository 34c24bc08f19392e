"""fmcore's optimizers."""

from fmcore.optim.adamw import FusedAdamW

__all__ = ["FusedAdamW"]
