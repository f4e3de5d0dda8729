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


@pytest.fixture(scope="module")
def mutation_baseline():
    """Our trainer and TRL's step for a model and backend, on ``conversational_rows()``, built once per module: a
    mutation changes our side only, so the mutation tests of one model share TRL's step."""
    built = {}

    def baseline(model_type: str = "llama", overrides: dict | None = None, attn_implementation: str = "sdpa"):
        key = (model_type, tuple(sorted((overrides or {}).items())), attn_implementation)
        if key not in built:
            trl_trainer, ours = make_trainers(
                conversational_rows(),
                model_type=model_type,
                model_overrides=overrides,
                attn_implementation=attn_implementation,
            )
            built[key] = ours, train_step(trl_trainer)
        return built[key]

    return baseline


@pytest.mark.parametrize("mutation", ["rejected_sees_chosen", "positions_continue"])
def test_comparison_fails_on_a_wrong_layout(mutation, monkeypatch, mutation_baseline):
    """The exactness comparison must catch the two ways prefix sharing can go wrong."""
    ours, trl_step = mutation_baseline()
    transform = None
    if mutation == "rejected_sees_chosen":
        mutations.responses_see_each_other(monkeypatch)
    else:
        transform = mutations.positions_continue
    ours_step = train_step(ours, transform)
    assert relative_error(ours_step.chosen_logps, trl_step.chosen_logps) <= 1e-5  # chosen rows are untouched
    assert relative_error(ours_step.rejected_logps, trl_step.rejected_logps) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)


@pytest.mark.parametrize(
    "model_type, overrides, attn_implementation, shift",
    [
        pytest.param(*MISTRAL_SLIDING.values, "sdpa", 1, id="mistral-sdpa-one-wider"),
        pytest.param(*MISTRAL_SLIDING.values, "sdpa", -1, id="mistral-sdpa-one-narrower"),
        pytest.param(*QWEN2_MIXED.values, "eager", 1, id="qwen2-mixed-eager-one-wider"),
        pytest.param(*QWEN2_MIXED.values, "eager", -1, id="qwen2-mixed-eager-one-narrower"),
    ],
)
def test_comparison_fails_on_a_window_off_by_one(
    model_type, overrides, attn_implementation, shift, monkeypatch, mutation_baseline
):
    """A sliding window one token too wide or too narrow (the conversations are longer than the window of 24)."""
    ours, trl_step = mutation_baseline(model_type, overrides, attn_implementation)
    mutations.window_off_by(monkeypatch, shift)
    mutations.assert_caught(train_step(ours), trl_step)


def test_comparison_fails_when_the_head_reads_the_wrong_states(mutation_baseline):
    ours, trl_step = mutation_baseline()
    mutations.assert_caught(train_step(ours, mutations.score_index_shifted), trl_step)


@pytest.mark.parametrize("mistake", ["boolean", "inverted", "zero_fill"])
def test_comparison_fails_on_a_wrong_eager_mask(mistake, monkeypatch, mutation_baseline):
    ours, trl_step = mutation_baseline(attn_implementation="eager")
    mutations.eager_mask_wrong(monkeypatch, mistake)
    mutations.assert_caught(train_step(ours), trl_step)
