import pytest

import minilora as ml


@pytest.fixture
def tiny_config():
    """The "tiny" reference configuration (DESIGN.md): gradient checks in float64."""
    return ml.GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32)
