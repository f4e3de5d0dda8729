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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tiny models. On two busy cores a second thread makes every op wait for the
    slower one: test_scale's single-process references took 2-3 s on either count with the cores free, and 35 s on
    two threads beside other work (3 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
