"""The adapter knows where each family keeps its parts, and how hidden states line up."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.adapters import get_adapter
from tinymodels import make_model


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba", "gpt_neox"])
def test_structure(family):
    model = make_model(family)
    ad = get_adapter(model)
    assert ad.family == family and ad.num_layers == 2 and len(ad.blocks()) == 2
    assert ad.embedding() is model.get_input_embeddings()
    assert ad.lm_head() is model.get_output_embeddings()
    block = ad.blocks()[0]
    assert ad.mixer(block) is not None and ad.mixer_norm(block) is not None and ad.final_norm() is not None
    ids = torch.randint(0, 384, (1, 10))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        base_out = ad.base()(input_ids=ids).last_hidden_state
        logits = model(ids).logits
    # hidden_states alignment is probed (tests/test_probes.py): whatever the release does, the probe must agree
    assert torch.equal(hs[0], ad.embedding()(ids)) == ad.hidden_states_has_embedding
    assert len(hs) == ad.num_layers + 1
    torch.testing.assert_close(ad.lm_head()(base_out), logits)


@pytest.mark.parametrize("family,shape", [("mamba", (64, 8)), ("falcon_mamba", (64, 8)), ("mamba2", (4,))])
def test_ssm_parameters(family, shape):
    ad = get_adapter(make_model(family))
    assert ad.is_ssm and tuple(ad.A(1).shape) == shape and bool((ad.A(1) < 0).all())
    assert ad.dt_bias(0).shape[0] == shape[0]
    assert ad.d_inner == 64 and ad.max_positions() is None
    assert ad.n_heads == (4 if family == "mamba2" else None)


def test_transformer_has_no_ssm_parameters():
    from ssmdiag.errors import SsmdiagError

    ad = get_adapter(make_model("gpt_neox"))
    assert not ad.is_ssm and ad.d_state is None and ad.max_positions() == 2048
    with pytest.raises(SsmdiagError, match="needs an SSM"):
        ad.A(0)
