"""PrefixDPOTrainer(prefix_sharing=True) against trl.DPOTrainer on the same batch, float32 on CPU.

Loss, per-sequence chosen/rejected log-probs, every parameter gradient and TRL's logged metrics must agree to a
relative error of 1e-5. The mutation tests at the end show that these comparisons fail when the mask or the positions
are wrong.
"""

import mutations
import pytest
from datasets import Dataset
from dpo_harness import (
    assert_flex_forward_matches,
    assert_same_step,
    conversational_rows,
    make_trainers,
    plain_text_rows,
    relative_error,
    train_step,
)

LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm",
]  # fmt: skip


def compare(dataset: Dataset, **kwargs) -> None:
    trl_trainer, ours = make_trainers(dataset, **kwargs)
    ours_step = train_step(ours)
    assert "shared_inputs" in ours_step.batch, "prefix sharing was not used"
    assert_same_step(ours_step, train_step(trl_trainer))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_backends_and_data_formats(attn_implementation, data):
    dataset = conversational_rows() if data == "conversational" else Dataset.from_list(plain_text_rows())
    compare(dataset, attn_implementation=attn_implementation)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types(loss_type):
    label_smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    compare(Dataset.from_list(plain_text_rows()), loss_type=[loss_type], label_smoothing=label_smoothing)


@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"ld_alpha": 0.5},
        {"use_weighting": True},
        {"f_divergence_type": "js_divergence"},
    ],
    ids=["sigmoid+sft", "ld_alpha", "use_weighting", "js_divergence"],
)
def test_loss_options(config):
    # Short sequences: f-divergences weight each gradient by a sigmoid of the log-ratio, whose float32 rounding grows
    # with the summed log-probs (about 1e-4 absolute on long conversations) rather than with the layout.
    compare(Dataset.from_list(plain_text_rows()), **config)


@pytest.mark.parametrize("reference", ["precompute", "path"])
def test_reference_log_probs(reference, tmp_path):
    compare(conversational_rows(), reference=reference, tmp_path=tmp_path)


LLAMA = pytest.param("llama", {}, id="llama")
MISTRAL_SLIDING = pytest.param("mistral", {"sliding_window": 24}, id="mistral-sliding-window")
QWEN2_MIXED = pytest.param(
    "qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}, id="qwen2-mixed-layers"
)
ARCHITECTURES = [
    LLAMA,
    pytest.param("mistral", {}, id="mistral"),
    MISTRAL_SLIDING,
    pytest.param("qwen2", {}, id="qwen2"),
    QWEN2_MIXED,
]


@pytest.mark.parametrize("model_type, overrides", ARCHITECTURES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_architectures(model_type, overrides, attn_implementation):
    compare(
        conversational_rows(),
        model_type=model_type,
        model_overrides=overrides,
        attn_implementation=attn_implementation,
    )


@pytest.mark.parametrize("model_type, overrides", [LLAMA, MISTRAL_SLIDING, QWEN2_MIXED])
def test_flex_attention_forward(model_type, overrides, fresh_compiler):
    """FlexAttention has no CPU backward, so its BlockMask is checked on the forward: the log-probs."""
    trl_trainer, ours = make_trainers(conversational_rows(), model_type=model_type, model_overrides=overrides)
    assert_flex_forward_matches(trl_trainer, ours)


@pytest.mark.parametrize("mutation", ["rejected_sees_chosen", "positions_continue"])
def test_comparison_fails_on_a_wrong_layout(mutation, monkeypatch):
    """The exactness comparison must catch the two ways prefix sharing can go wrong."""
    trl_trainer, ours = make_trainers(conversational_rows())
    transform = None
    if mutation == "rejected_sees_chosen":
        mutations.responses_see_each_other(monkeypatch)
    else:
        transform = mutations.positions_continue
    ours_step, trl_step = train_step(ours, transform), train_step(trl_trainer)
    assert relative_error(ours_step.chosen_logps, trl_step.chosen_logps) <= 1e-5  # chosen rows are untouched
    assert relative_error(ours_step.rejected_logps, trl_step.rejected_logps) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)
