"""Multi-step runs that a command calls: polarize (patch, diagnose, fine-tune, save, reload check), the MQAR grid,
the needle grid (grid.json, cells.jsonl, resume, shards)."""
