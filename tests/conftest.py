import pytest
import torch


@pytest.fixture
def fresh_compiler():
    """FlexAttention on CPU compiles through inductor once per process, recompiling for new shapes and score_mods.
    In torch 2.13 some of those recompilations (a soft-capping score_mod after other shapes) do not build, so each
    flex test starts and leaves with a fresh compiler instead of depending on test order."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
