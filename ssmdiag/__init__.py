"""ssmdiag: diagnose recency and over-smoothing in state-space-model checkpoints."""

__version__ = "0.1.0"
