"""The loader: every family and format through the real code path, and every user error as a clean message."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ssmdiag import original_format
from ssmdiag.errors import SsmdiagError
from ssmdiag.loading import load_model, require_tokenizer
from tinymodels import make_model, save_checkpoint

IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba", "gpt_neox"])
def test_hf_dir_loads_with_identical_logits(family, tiny_root, tiny_tokenizer_dir):
    reference = make_model(family, seed=11)
    path = save_checkpoint(reference, tiny_root / f"roundtrip_{family}", tiny_tokenizer_dir)
    loaded = load_model(str(path), backend="hf")
    assert loaded.family == family and loaded.source == "local"
    assert loaded.tokenizer is not None and loaded.adapter.is_ssm == (family != "gpt_neox")
    assert loaded.weights_hash and loaded.weights_hash.startswith("sha256-fp:")
    with torch.no_grad():
        assert torch.equal(reference(IDS).logits, loaded.model(IDS).logits)


@pytest.mark.parametrize("family,fixture", [("mamba", "tiny_original_mamba_dir"), ("mamba2", "tiny_original_mamba2_dir")])
def test_original_format_logits_identical(family, fixture, request):
    path = request.getfixturevalue(fixture)
    reference = make_model(family, seed=3 if family == "mamba" else 4)
    loaded = load_model(str(path), backend="hf")
    assert loaded.source == "original" and loaded.family == family
    assert type(loaded.model) is type(reference)
    with torch.no_grad():
        assert torch.equal(reference(IDS).logits, loaded.model(IDS).logits)


def test_original_format_needs_tokenizer(tiny_original_mamba_dir, tiny_tokenizer_dir):
    loaded = load_model(str(tiny_original_mamba_dir), backend="hf")
    assert loaded.tokenizer is None
    with pytest.raises(SsmdiagError) as err:
        require_tokenizer(loaded)
    assert "--tokenizer" in err.value.hint
    loaded = load_model(str(tiny_original_mamba_dir), tokenizer=str(tiny_tokenizer_dir), backend="hf")
    assert require_tokenizer(loaded) is loaded.tokenizer


def test_original_format_vocab_padding(tmp_path):
    cfg = {"d_model": 32, "n_layer": 1, "vocab_size": 380, "pad_vocab_size_multiple": 8, "ssm_cfg": {"d_state": 4}}
    config = original_format.to_hf_config(cfg)
    assert config.vocab_size == 384 and config.state_size == 4 and config.model_type == "mamba"


def test_preset_random_is_seeded_and_aliased():
    a = load_model("pythia-70m", init="random", seed=1, device="cpu")
    b = load_model("EleutherAI/pythia-70m", init="random", seed=1, device="cpu")
    c = load_model("pythia-70m", init="random", seed=2, device="cpu")
    wa, wb, wc = (m.adapter.embedding().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.source == "preset" and a.family == "gpt_neox" and a.adapter.max_positions() == 2048


def test_meta_preset_builds_huge_model_without_memory():
    loaded = load_model("mamba-codestral-7b", init="random", meta=True)
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 7.0e9 < params < 7.5e9
    A = loaded.adapter.A(0)  # A_log is materialised from the model's own init even on meta
    assert A.shape == (128,) and bool((A < 0).all())


@pytest.mark.parametrize("spec,init,needle", [
    ("does/not/exist/dir", "pretrained", "does not exist"),
    ("mamba-130m", "pretrained", "cannot download"),
    ("state-spaces/mamba-130m-hf", "pretrained", "cannot download"),
    ("someone/unknown-model", "pretrained", "cannot download"),
    ("no-such-preset", "random", "unknown preset"),
])
def test_spec_errors(spec, init, needle):
    with pytest.raises(SsmdiagError) as err:
        load_model(spec, init=init)
    assert needle in err.value.message


def test_offline_preset_hint_mentions_init_random():
    with pytest.raises(SsmdiagError) as err:
        load_model("mamba-130m")
    assert "--init random" in err.value.hint


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(SsmdiagError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SsmdiagError, match="neither a transformers config"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=16, d_kv=8).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SsmdiagError) as err:
        load_model(str(tmp_path))
    assert "unsupported architecture 't5'" in err.value.message and "mamba2" in err.value.hint
    assert "causal language models" in err.value.message and "encoder-decoder" in err.value.message


def _cli(*args):
    from typer.testing import CliRunner

    from ssmdiag.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_one_error_line(result, *needles):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    hints = [line for line in result.output.splitlines() if line.startswith("Hint:")]
    assert len(errors) == 1 and len(hints) == 1, result.output
    for needle in needles:
        assert needle in errors[0] + hints[0], result.output


def test_bert_checkpoint_refused_by_model_type(tmp_path):
    """A saved BERT (masked LM) and the issue's minimal bert config (hidden 32, 12 heads: unbuildable) are both
    refused by name before any weights load; the same family saved as a decoder is a causal LM and loads."""
    from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=100)
    BertForMaskedLM(BertConfig(**small)).save_pretrained(tmp_path / "bert")
    minimal = tmp_path / "minimal"
    minimal.mkdir()
    (minimal / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (minimal / "model.safetensors").write_bytes(b"x")
    for path in (tmp_path / "bert", minimal):
        with pytest.raises(SsmdiagError) as err:
            load_model(str(path))
        assert "'bert'" in err.value.message and "causal language models" in err.value.message
        _assert_one_error_line(_cli("info", path, "--out", tmp_path / "runs"), "'bert'", "causal language models")
    BertLMHeadModel(BertConfig(**small, is_decoder=True)).save_pretrained(tmp_path / "decoder")
    assert load_model(str(tmp_path / "decoder")).family == "other"


def test_unknown_model_type_gets_a_hint(tmp_path):
    cfg = {"model_type": "mamba_from_the_future", "hidden_size": 32}
    for name, extra in (("newer", {}), ("custom", {"auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                                 "AutoModelForCausalLM": "modeling_x.XForCausalLM"}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **extra}))
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    result = _cli("info", tmp_path / "newer", "--out", tmp_path / "runs")
    _assert_one_error_line(result, "'mamba_from_the_future'", "does not know", "upgrade transformers",
                           "--trust-remote-code")
    result = _cli("info", tmp_path / "custom", "--out", tmp_path / "runs")
    _assert_one_error_line(result, "own Python code", "--trust-remote-code")


def test_original_format_embedding_smaller_than_vocab_refused(tmp_path):
    """The issue's case: 250 embedding rows, config vocab 257 (ids 250-256 would have no row)."""
    model = make_model("mamba", seed=6, vocab_size=250)
    original_format.save(model, tmp_path / "orig")
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    cfg.update(vocab_size=257, pad_vocab_size_multiple=8)
    (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SsmdiagError, match="250 rows but its config.json says vocab_size 257"):
        load_model(str(tmp_path / "orig"))
    _assert_one_error_line(_cli("info", tmp_path / "orig", "--out", tmp_path / "runs"), "250 rows", "config.json")
    cfg.update(vocab_size=245)  # more rows than the vocab (padding): the rows win, as before
    (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path / "orig"), backend="hf").adapter.vocab_size == 250


def test_other_causal_lm_loads_as_other(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "other" and not loaded.adapter.is_ssm and len(loaded.adapter.blocks()) == 2


def test_corrupt_weights(tmp_path, tiny_tokenizer_dir):
    path = save_checkpoint(make_model("mamba"), tmp_path / "m", tiny_tokenizer_dir)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SsmdiagError, match="corrupt|cannot load"):
        load_model(str(path))


def test_bin_is_loaded_weights_only(tmp_path):
    original_format.save(make_model("mamba", seed=5), tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    # refused unread, named as unsafe (issue: never "corrupt", never a hint to turn weights_only off)
    with pytest.raises(SsmdiagError, match="refused to load the weights.*not plain tensors") as err:
        load_model(str(tmp_path))
    assert "weights_only" not in str(err.value) and "weights_only" not in str(err.value.hint)


def test_device_and_dtype_errors(tiny_mamba_dir):
    if not torch.cuda.is_available():
        with pytest.raises(SsmdiagError, match="no CUDA GPU"):
            load_model(str(tiny_mamba_dir), device="cuda")
    with pytest.raises(SsmdiagError, match="unknown dtype"):
        load_model(str(tiny_mamba_dir), dtype="float8")
    with pytest.raises(SsmdiagError, match="device-map"):
        load_model(str(tiny_mamba_dir), device_map="balanced")
    with pytest.raises(SsmdiagError, match="needs pretrained weights"):
        load_model("mamba-130m", init="random", device_map="auto")


def test_dtype_bf16(tiny_mamba_dir):
    loaded = load_model(str(tiny_mamba_dir), dtype="bfloat16", backend="hf")
    assert loaded.dtype == torch.bfloat16


def test_missing_package_at_load_is_not_called_corrupt(tiny_mamba_dir, monkeypatch):
    """transformers 5.25 without `kernels` raises at load time; the user is told what is missing, not 'corrupt'."""
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("Kernels are not available. Please install a compatible version (0.19.1 <= version < 0.20.0), "
                         "e.g. `pip install kernels==0.19.1`")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(SsmdiagError, match="Kernels are not available") as err:
        load_model(str(tiny_mamba_dir))
    assert "corrupt" not in err.value.hint and "docs/install.md" in err.value.hint
