"""PrefixDPOTrainer(prefix_sharing=True) against trl.DPOTrainer on the same batch, float32 on CPU.

Loss, per-sequence chosen/rejected log-probs, every parameter gradient and TRL's logged metrics must agree to a
relative error of 1e-5; so must the accumulated gradients of the trainers' own dataloaders and training steps, and
training on sequences cut by ``--max_length`` (and ``--max_prompt_length``). The mutation tests at the end show that
these comparisons fail when the mask or the positions are wrong.
"""

import mutations
import pytest
import torch
from datasets import Dataset
from dpo_harness import (
    StepResult,
    accumulated_step,
    assert_each_close,
    assert_flex_forward_matches,
    assert_same_accumulation,
    assert_same_step,
    conversational_rows,
    conversations,
    make_trainers,
    plain_text_rows,
    relative_error,
    train_step,
)
from trl import DPOTrainer

from prefix_dpo_trainer import PrefixDPOTrainer

LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm",
]  # fmt: skip


def compare_steps(ours: PrefixDPOTrainer, trl_trainer: DPOTrainer, examples: list | None = None) -> StepResult:
    """One step of each on ``examples`` (by default each its own training set); returns TRL's."""
    ours_step, trl_step = train_step(ours, examples=examples), train_step(trl_trainer, examples=examples)
    assert "shared_inputs" in ours_step.batch, "prefix sharing was not used"
    assert_same_step(ours_step, trl_step)
    return trl_step


def compare(dataset: Dataset, **kwargs) -> None:
    trl_trainer, ours = make_trainers(dataset, **kwargs)
    compare_steps(ours, trl_trainer)


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
    trl_trainer, ours = make_trainers(conversational_rows(), reference=reference, tmp_path=tmp_path)
    trl_step = compare_steps(ours, trl_trainer)
    # The reference is not the policy, so the rewards (and every loss but log 2) depend on its log-probs.
    assert abs(trl_step.metrics["rewards/chosen"]) > 1e-2 and abs(trl_step.metrics["rewards/rejected"]) > 1e-2


def test_gradient_accumulation_through_the_trainers_dataloader():
    """Trainer's own path: batches of its train dataloader through ``training_step``, two micro-batches accumulated.
    Both trainers' loaders draw the same examples in the same order (the same seeded sampler)."""
    trl_trainer, ours = make_trainers(conversations(), per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ours_step = accumulated_step(ours, 2)
    assert all("shared_inputs" in batch for batch in ours_step.batches)
    assert_same_accumulation(ours_step, accumulated_step(trl_trainer, 2))


def test_max_length_truncation_matches_trl():
    """keep_start truncation, TRL's only mode: TRL's collator cuts each sequence to ``max_length`` tokens, ours cuts
    the responses when preparing the dataset; both drop the example whose prompt alone fills ``max_length``."""
    max_length = 90
    trl_trainer, ours = make_trainers(conversations(), max_length=max_length)
    prompts = [len(example["prompt_ids"]) for example in trl_trainer.train_dataset]
    longest = [len(p) + max(len(c), len(r)) for p, c, r in zip(*_token_columns(trl_trainer), strict=True)]
    assert len(trl_trainer.train_dataset) == len(ours.train_dataset) == 3, "one prompt fills max_length"
    assert max(prompts) < max_length < max(longest), "responses must be cut"
    compare_steps(ours, trl_trainer)


def test_max_prompt_length_matches_trl_on_the_pre_truncated_data():
    """``max_prompt_length`` is ours only: a prompt is cut to its last tokens, then the responses to fit. TRL has
    no such flag, so it trains on the examples as our preparation cut them, and must agree."""
    max_length, max_prompt_length = 90, 80
    trl_trainer, ours = make_trainers(conversations(), max_length=max_length, max_prompt_length=max_prompt_length)
    cut, full = _token_columns(ours), _token_columns(trl_trainer)
    # The first prompt alone fills max_length: TRL drops the example, ours keeps it with the prompt cut.
    assert len(cut[0]) == 4 and len(full[0]) == 3 and len(cut[0][0]) == max_prompt_length
    prompts, chosen = list(zip(cut[0][1:], full[0], strict=True)), list(zip(cut[1][1:], full[1], strict=True))
    assert any(len(prompt) < len(whole) for prompt, whole in prompts), "a prompt must be cut"
    assert all(prompt == whole[len(whole) - len(prompt) :] for prompt, whole in prompts), "its end is kept"
    assert any(len(response) < len(whole) for response, whole in chosen), "a response must be cut"
    assert all(response == whole[: len(response)] for response, whole in chosen), "its start is kept"
    compare_steps(ours, trl_trainer, examples=list(ours.train_dataset))


def _token_columns(trainer: DPOTrainer) -> tuple[list[list[int]], ...]:
    return tuple(trainer.train_dataset[column] for column in ("prompt_ids", "chosen_ids", "rejected_ids"))


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


# bf16 autocast rounds the two layouts differently. Measured on these batches: loss within 6.3e-4 of TRL's,
# per-sequence log-probs within 1.6e-4, gradients within 8.4e-3, mean logits (about 0.007) within 2e-5. Positions that
# do not restart after the prompt move the loss by 1.7e-2 or more, the rejected log-probs by 3.2e-2, every gradient by
# 0.2.
BF16_RTOL = 2e-3
BF16_GRAD_RTOL = 3e-2


@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_bf16_autocast_matches_trl_and_fails_on_a_wrong_layout(data):
    """Under bf16 autocast (on the CPU) our step is TRL's to bf16 precision, and a wrong layout is well outside it:
    the loss alone would catch it only at a tolerance under 1.7e-2 (the plain-text batch)."""
    dataset = conversations() if data == "conversational" else Dataset.from_list(plain_text_rows())
    trl_trainer, ours = make_trainers(dataset, bf16=True, use_cpu=True)
    dtypes = []
    projection = ours.model.model.layers[0].self_attn.q_proj
    projection.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    trl_step, ours_step = train_step(trl_trainer), train_step(ours)
    assert set(dtypes) == {torch.bfloat16}, "bf16 autocast is on"
    assert_same_step(ours_step, trl_step, BF16_RTOL, grad_rtol=BF16_GRAD_RTOL, metrics_atol=1e-4)
    wrong = train_step(ours, mutations.positions_continue)
    assert relative_error(wrong.loss, trl_step.loss) > BF16_RTOL
    with pytest.raises(AssertionError):
        assert_each_close(wrong.rejected_logps, trl_step.rejected_logps, BF16_RTOL)
    for name, grad in trl_step.grads.items():
        assert relative_error(wrong.grads[name], grad) > BF16_GRAD_RTOL, name


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
