import os

import pytest
import torch
from hypothesis import settings

# In CI the property tests draw the same examples on every run, so that a failure there reproduces and a pass is not
# luck (local runs draw new ones, to find what CI's do not). No deadline: on a loaded machine any example can be slow.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")


@pytest.fixture
def fresh_compiler():
    """FlexAttention on CPU compiles through inductor once per process, recompiling for new shapes and score_mods.
    In torch 2.13 some of those recompilations (a soft-capping score_mod after other shapes) do not build, so each
    flex test starts and leaves with a fresh compiler instead of depending on test order."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
