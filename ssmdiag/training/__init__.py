"""Training: the generic loop (loop.py), fine-tuning tasks (finetune.py) and the MQAR grid of Table 2 (mqar_grid.py)."""
