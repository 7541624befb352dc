"""Session fixtures: tiny random checkpoints of every family, saved to a temp dir, loaded through the real loader."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tinymodels import make_model, save_checkpoint, train_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One compute thread for torch and numba: tiny models on a shared 2-core machine run far faster that way
    (OpenMP/numba spin-waits make 2 threads up to 10x slower under load)."""
    import numba

    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(saved[0])
    numba.set_num_threads(saved[1])


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_root):
    path = tiny_root / "tokenizer"
    train_tokenizer(path)
    return path


def _family_dir(tiny_root, tiny_tokenizer_dir, family):
    path = tiny_root / family
    if not (path / "config.json").exists():
        save_checkpoint(make_model(family), path, tiny_tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def tiny_mamba_dir(tiny_root, tiny_tokenizer_dir):
    return _family_dir(tiny_root, tiny_tokenizer_dir, "mamba")


@pytest.fixture(scope="session")
def tiny_mamba2_dir(tiny_root, tiny_tokenizer_dir):
    return _family_dir(tiny_root, tiny_tokenizer_dir, "mamba2")


@pytest.fixture(scope="session")
def tiny_falcon_mamba_dir(tiny_root, tiny_tokenizer_dir):
    return _family_dir(tiny_root, tiny_tokenizer_dir, "falcon_mamba")


@pytest.fixture(scope="session")
def tiny_gpt_neox_dir(tiny_root, tiny_tokenizer_dir):
    return _family_dir(tiny_root, tiny_tokenizer_dir, "gpt_neox")


@pytest.fixture(scope="session")
def tiny_original_mamba_dir(tiny_root):
    """A Mamba checkpoint in the original state-spaces format (config d_model/n_layer, pytorch_model.bin)."""
    from ssmdiag import original_format

    path = tiny_root / "original_mamba"
    if not (path / "config.json").exists():
        original_format.save(make_model("mamba", seed=3), path)
    return path


@pytest.fixture(scope="session")
def tiny_original_mamba2_dir(tiny_root):
    from ssmdiag import original_format

    path = tiny_root / "original_mamba2"
    if not (path / "config.json").exists():
        original_format.save(make_model("mamba2", seed=4), path)
    return path
