"""PRISM as an lm-evaluation-harness model: ``prism lm-eval`` runs any lm-eval task on the gated model and reports
how often the gate opened on each task (``harness.lm.PrismLM`` is the model, registered as ``prism``)."""
