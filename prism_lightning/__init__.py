"""prism_lightning: PRISM (persona routing via intent-based self-modeling) on Lightning."""

from prism_lightning.errors import PrismError

__version__ = "0.1.0"
__all__ = ["PrismError", "__version__"]
