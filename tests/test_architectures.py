"""Exactness on every architecture of ``embedded.TINY_MODEL_TYPES`` against trl.DPOTrainer (float32, relative error
1e-5, see dpo_harness), with the attention backends each supports, and clear errors where a mask cannot do the job.

test_exactness.py covers Llama, Mistral (with a sliding window) and Qwen2 (with mixed full/sliding layers) under
sdpa and eager; this file adds Qwen3, Gemma 2 and Phi-3, and packs each architecture that has sliding windows
(several examples per row, so that documents and windows meet inside a row; test_packing.py packs Llama). Windows
are set to 16 tokens, shorter than every sequence, so that they cut into the context (the real models' windows of
thousands of tokens would not).

Gemma 2 soft-caps its attention logits: eager and FlexAttention apply the soft-cap, sdpa cannot. transformers
refuses sdpa for Gemma 2 and raises in the forward should a soft-cap reach sdpa, so trl.DPOTrainer has no (silently
wrong) sdpa baseline; prefix sharing refuses it up front with an error naming eager and flex_attention.
"""

import pytest
import torch
from dpo_harness import assert_flex_forward_matches, assert_same_step, conversations, make_trainers, train_step

from collators import attention_mask_for, attention_windows
from embedded import tiny_model, tiny_model_config

WINDOW = 16


QWEN2_MIXED = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}
QWEN3_MIXED = QWEN2_MIXED  # layer 0 full attention, layer 1 sliding
GEMMA2 = {"sliding_window": WINDOW}  # sliding and full layers (its own pattern), attention and final soft-capping


@pytest.mark.parametrize(
    "model_type, overrides, attn_implementation, packed",
    [
        pytest.param("qwen3", {}, "sdpa", False, id="qwen3-sdpa"),
        pytest.param("qwen3", {}, "eager", False, id="qwen3-eager"),
        pytest.param("qwen3", QWEN3_MIXED, "sdpa", True, id="qwen3-mixed-layers-sdpa-packed"),
        pytest.param("gemma2", GEMMA2, "eager", False, id="gemma2-eager"),
        pytest.param("gemma2", GEMMA2, "eager", True, id="gemma2-eager-packed"),
        pytest.param("phi3", {}, "sdpa", False, id="phi3-sdpa"),
        pytest.param("phi3", {}, "eager", False, id="phi3-eager"),
        pytest.param("phi3", {"sliding_window": WINDOW}, "sdpa", True, id="phi3-sliding-window-sdpa-packed"),
        pytest.param("mistral", {"sliding_window": WINDOW}, "sdpa", True, id="mistral-sliding-window-sdpa-packed"),
        pytest.param("qwen2", QWEN2_MIXED, "sdpa", True, id="qwen2-mixed-layers-sdpa-packed"),
    ],
)
def test_architecture(model_type, overrides, attn_implementation, packed):
    """``packed``: prefix sharing and packing, the examples in rows of 384 tokens, several to a row."""
    trl_trainer, ours = make_trainers(
        conversations(),
        model_type=model_type,
        model_overrides=overrides,
        attn_implementation=attn_implementation,
        packing_length=384 if packed else None,
    )
    ours_step = train_step(ours)
    rows = len(ours_step.batch["shared_inputs"]["input_ids"])
    assert rows < len(ours.train_dataset) if packed else rows == len(ours.train_dataset)
    assert_same_step(ours_step, train_step(trl_trainer))


def test_gemma2_flex_attention_forward(fresh_compiler):
    """FlexAttention (GPU in training: no CPU backward) gets one BlockMask per layer kind and applies Gemma 2's
    soft-cap in its score_mod: the log-probs match trl.DPOTrainer's under eager. (test_exactness.py checks
    FlexAttention on Llama, Mistral and Qwen2.)"""
    trl_trainer, ours = make_trainers(
        conversations(), model_type="gemma2", model_overrides=GEMMA2, attn_implementation="eager"
    )
    assert_flex_forward_matches(trl_trainer, ours)


def test_gemma2_under_sdpa_is_a_clear_error():
    model = tiny_model("gemma2", attn_implementation="eager")
    with pytest.raises(ValueError, match="does not support an attention implementation through"):
        model.set_attn_implementation("sdpa")  # transformers: no sdpa for Gemma 2, so no sdpa baseline in TRL
    trl_trainer, ours = make_trainers(conversations(2), model_type="gemma2", attn_implementation="eager")
    for trainer in (trl_trainer, ours):
        trainer.model.config._attn_implementation = "sdpa"  # forced past transformers' check
    with pytest.raises(ValueError, match="`sdpa` attention does not support `softcap`"):
        train_step(trl_trainer)  # transformers raises in the forward rather than compute uncapped attention
    with pytest.raises(ValueError, match="'gemma2' soft-caps its attention logits.*eager.*flex_attention"):
        train_step(ours)


@pytest.mark.parametrize("backend", ["eager", "flex_attention"])
def test_softcapping_is_fine_where_it_is_applied(backend):
    config = tiny_model_config("gemma2", sliding_window=WINDOW)
    config._attn_implementation = backend
    assert attention_windows(config) == {"sliding_attention": WINDOW, "full_attention": None}


def test_softcapping_under_sdpa_fails_before_any_mask_is_built():
    config = tiny_model_config("gemma2")
    config._attn_implementation = "sdpa"
    shared = {"sequence_ids": torch.zeros(1, 4, dtype=torch.long)}  # never reached
    with pytest.raises(ValueError, match="--attn_implementation eager"):
        attention_mask_for(shared, config, torch.float32)


def test_unsupported_layer_kind_names_the_model_type():
    config = tiny_model_config("qwen3")
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="'qwen3' has 'chunked_attention' layers"):
        attention_windows(config)
