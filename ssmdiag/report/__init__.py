"""`ssmdiag report`: every diagnostic of one or two models on one self-contained page (registry, reading, rendering)."""
