"""prism_lightning: PRISM (persona routing via intent-based self-modeling) on Lightning.

Layers, bottom to top (docs/architecture.md): utils < distributed < model < contexts | inference < bootstrap <
evaluation < training | study < cli.
"""

from prism_lightning import deprecated_paths
from prism_lightning.utils.errors import PrismError

__version__ = "0.1.0"
__all__ = ["GatedModel", "PrismError", "__version__"]

deprecated_paths.install()


def __getattr__(name: str):
    # Lazy, so that `import prism_lightning` stays light (no torch/transformers import until needed).
    if name == "GatedModel":
        from prism_lightning.inference.gated_model import GatedModel
        return GatedModel
    raise AttributeError(name)
