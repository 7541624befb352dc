"""Polarization as a library (Wang et al., ICLR 2025, §6 and App. E.5): state channels or heads whose Ā = exp(Δ·A)
is exactly 1 or exactly 0.

record.py   the polarized A values, the config record (`ssmdiag_polarized`), the Ā check, the report
surgery.py  add or repurpose polarized channels (Mamba-1 / FalconMamba) or heads (Mamba-2) in a model
masks.py    which parameter entries training must keep fixed, or may train (`--trainable`)
"""
