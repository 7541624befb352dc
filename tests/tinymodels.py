"""Tiny random checkpoints and an offline tokenizer for tests (no network, seconds to build)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384

_CORPUS_WORDS = ("the state space model reads every token once and keeps a memory that decays with distance "
                 "capital of France is Paris Madrid Rome Berlin magic number question answer context ignore "
                 "fact only use information in the document a b c d e 0 1 2 3 4 5 6 7 8 9 . , ? ! :").split()


def train_tokenizer(path: Path, vocab_size: int = VOCAB):
    """Train a byte-level BPE tokenizer offline and save it as a transformers fast tokenizer."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(30)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(path)
    return fast


def make_config(family: str, **overrides):
    """A tiny transformers config of a family: hidden 32, 2 layers, vocab 384."""
    from transformers import FalconMambaConfig, GPTNeoXConfig, Mamba2Config, MambaConfig

    base = dict(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    if family == "mamba":
        cfg = dict(base, state_size=8, expand=2, conv_kernel=4, time_step_rank=4)
        return MambaConfig(**{**cfg, **overrides})
    if family == "falcon_mamba":
        cfg = dict(base, state_size=8, expand=2, conv_kernel=4, time_step_rank=4)
        return FalconMambaConfig(**{**cfg, **overrides})
    if family == "mamba2":
        cfg = dict(base, state_size=16, expand=2, head_dim=16, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=16,
                   tie_word_embeddings=True)
        return Mamba2Config(**{**cfg, **overrides})
    if family == "gpt_neox":
        cfg = dict(base, num_attention_heads=4, intermediate_size=64, max_position_embeddings=2048, hidden_act="gelu",
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                   use_parallel_residual=True, tie_word_embeddings=False)
        return GPTNeoXConfig(**{**cfg, **overrides})
    raise ValueError(family)


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny random model of a family (transformers' own init), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family, **overrides)).eval()


def save_checkpoint(model, path: Path, tokenizer_dir: Path | None = None) -> Path:
    """save_pretrained the model (safetensors) and copy the tokenizer beside it."""
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def scan_inputs(t: dict, dtype, grad: bool = False) -> dict:
    """Scan test inputs in `dtype` (A in float32, or float64 for float64), optionally requiring gradients."""
    t = {k: v.to(dtype if k != "A" else (torch.float64 if dtype == torch.float64 else torch.float32))
         for k, v in t.items()}
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    return t
