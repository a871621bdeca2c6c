"""prism_lightning: PRISM (persona routing via intent-based self-modeling) on Lightning."""

from prism_lightning.errors import PrismError

__version__ = "0.1.0"
__all__ = ["GatedModel", "PrismError", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import prism_lightning` stays light (no torch/transformers import until needed).
    if name == "GatedModel":
        from prism_lightning.routing import GatedModel
        return GatedModel
    raise AttributeError(name)
