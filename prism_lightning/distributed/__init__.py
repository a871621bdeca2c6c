"""Several processes: collectives, rank sharding of stage files, strategies (DeepSpeed on CPU too), launch, Slurm,
ZeRO checkpoint conversion, per-rank RNG state.

Import the submodule you need: ``sharding`` and ``collectives`` stay free of Lightning and DeepSpeed, so the model
layer may use them; ``strategies``, ``launch``, ``slurm`` and ``zero_checkpoint`` are for training and the CLI.
"""
