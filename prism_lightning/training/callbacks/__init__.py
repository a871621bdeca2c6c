"""Lightning callbacks for PRISM runs, installed as ``prism_lightning.training.callbacks``."""
