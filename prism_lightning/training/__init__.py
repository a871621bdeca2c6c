"""Training with Lightning: the DataModule, the LightningModules, loss math, the teacher cache, calibration, the
callbacks and the run summary."""
