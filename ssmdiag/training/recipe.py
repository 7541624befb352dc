"""Training recipes of the MQAR grid and of MQAR fine-tuning: `paper` (the paper's released code) or `hf`.

`paper` follows VITA-Group/SSM-Bottleneck (associative_recall/train.py, model.py, multi_depth_mqra.py;
zoology's MQAR generator) item by item; what ssmdiag cannot copy (its HF Mamba has RMSNorm where the reference's
final norm is a LayerNorm) is listed in docs/polarize.md:

- init: the reference applies one init to the whole model: every Linear weight N(0, 0.02) and every Linear bias
  zero, dt_proj's included (so Δ = softplus(0) ≈ 0.693 on every channel at the start); embeddings N(0, 0.02)
  (tied to the head); out_proj N(0, 0.02/√(2·layers)); the depthwise conv keeps PyTorch's default init;
  A = 1…N (S4D-real) and D = 1 as Mamba's; norms 1.
- optimiser: AdamW, betas (0.9, 0.999), weight decay 0.1 on every parameter, no clipping, no warm-up; the
  learning rate is constant within an epoch and follows a cosine over the epochs (CosineAnnealingLR per epoch).
- data: a fixed training set (each segment generated once), read in the same order every epoch, batch by batch,
  segment after segment; filler 0. Validation = the test sets, after every epoch; early stop when the mean
  accuracy exceeds 0.99; the model is the one of the last epoch.

`hf` is ssmdiag's earlier recipe: transformers' init (Linear N(0, 0.1), Δ in [1e-3, 0.1]), AdamW betas
(0.9, 0.98), gradient clipping 1.0, linear warm-up then per-step cosine, no decay on A_log/D/biases/norms/
embeddings, fresh batches every step drawn from the mixture, a separate validation set.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RECIPES = ("paper", "hf")  # --recipe
REFERENCE_STD = 0.02  # associative_recall/model.py: _init_weights(initializer_range=0.02)
REFERENCE_BETAS = (0.9, 0.999)  # torch.optim.AdamW's default, used by associative_recall/train.py
HF_BETAS = (0.9, 0.98)
EARLY_STOP = 0.99  # associative_recall/config.py: early_stopping_threshold


@torch.no_grad()
def reference_init(model: nn.Module, n_layers: int, std: float = REFERENCE_STD) -> None:
    """Re-initialise a fresh HF Mamba the way the paper's code initialises its models (in place).

    Args:
        n_layers: the model's layer count (the out_proj scale 1/√(2·n_layers)).
    """
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=std)
        elif isinstance(mod, nn.Conv1d):
            mod.reset_parameters()  # the reference never touches the conv: PyTorch's default
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight"):
            nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
        elif name.endswith(".D"):
            p.fill_(1.0)
        elif name.endswith("A_log"):  # S4D-real: A = 1 … N in every channel
            p.copy_(torch.log(torch.arange(1, p.shape[-1] + 1, dtype=p.dtype)).expand_as(p))
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)


def optimiser_settings(recipe: str) -> dict:
    """TrainConfig fields of a recipe's optimiser (betas, decay on everything or matrices only, clipping)."""
    if recipe == "paper":
        return {"betas": REFERENCE_BETAS, "decay_all": True, "grad_clip": 0.0, "warmup": 0}
    return {"betas": HF_BETAS, "decay_all": False, "grad_clip": 1.0}
