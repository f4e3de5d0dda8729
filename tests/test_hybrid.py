"""Hybrid models: convolution (LFM2) and state-space (NemotronH's Mamba-2) layers mix tokens whatever the attention
mask says, so the shared and packed layouts would let chosen tokens reach rejected ones. PrefixDPOTrainer trains them
on TRL's standard layout, with one warning naming the layer kind, exactly as trl.DPOTrainer does (float32, relative
error 1e-5). The last test shows the fallback is needed: forced into the shared layout, LFM2 fails the comparison.
"""

import warnings

import pytest
from dpo_harness import assert_same_step, conversations, make_trainers, relative_error, train_step

import collators
import shared_layout
from collators import unmasked_token_mixers
from embedded import load_tokenizer, tiny_model
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer


@pytest.mark.parametrize(
    "model_type, kind, packing_length",
    [("lfm2", "conv", 384), ("nemotron_h", "linear_attention", None)],
    ids=["lfm2-sharing+packing", "nemotron-h-sharing"],
)
def test_hybrid_model_trains_exactly_on_the_standard_layout(model_type, kind, packing_length):
    trl_trainer, ours = make_trainers(conversations(), model_type=model_type, packing_length=packing_length)
    assert f"'{kind}' layers" in ours.standard_layout_reason
    assert not ours.shares_prefix and not ours.packs
    ours_step = train_step(ours)
    assert "shared_inputs" not in ours_step.batch
    assert_same_step(ours_step, train_step(trl_trainer))


def test_the_fallback_warns_once_naming_the_layer_kind(tmp_path):
    args = PrefixDPOConfig(
        output_dir=str(tmp_path), report_to="none", bf16=False, prefix_sharing=True, precompute_ref_log_probs=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PrefixDPOTrainer(
            model=tiny_model("lfm2"), args=args, train_dataset=conversations(), processing_class=load_tokenizer()
        )
    fallback = [str(w.message) for w in caught if "off for this model" in str(w.message)]
    assert len(fallback) == 1  # precompute and __init__ both set up the layout; the warning comes once
    assert "Model type 'lfm2' has 'conv' layers" in fallback[0]
    assert "--prefix_sharing, --enable_packing and --group_by_prefix are off for this model" in fallback[0]


@pytest.mark.parametrize(
    "model_type, expected",
    [
        ("llama", []),
        ("gemma2", []),  # sliding and full attention: both have a mask
        ("qwen3_moe", []),  # experts are per token
        ("lfm2", ["conv"]),
        ("nemotron_h", ["linear_attention"]),  # its "moe" layers are per token
    ],
)
def test_unmasked_token_mixers_from_the_layer_types(model_type, expected):
    assert unmasked_token_mixers(tiny_model(model_type)) == expected


def test_a_config_without_layer_types_is_read_from_the_convolutions():
    """A config that lists no layer kinds (LFM2-MoE's) is read from the causal ``nn.Conv1d`` of its mixers."""
    model = tiny_model("lfm2")
    model.config.layer_types = None
    assert unmasked_token_mixers(model) == ["Lfm2ShortConv"]


def test_without_the_fallback_the_comparison_fails(monkeypatch):
    """LFM2 forced into the shared layout: the convolution carries the chosen tokens into the rejected ones."""
    monkeypatch.setattr(shared_layout, "unmasked_token_mixers", lambda model: [])
    full_attention = {"full_attention": None}
    monkeypatch.setattr(shared_layout, "attention_windows", lambda config: full_attention)
    monkeypatch.setattr(collators, "attention_windows", lambda config: full_attention)
    trl_trainer, ours = make_trainers(conversations(), model_type="lfm2")
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert "shared_inputs" in ours_step.batch
    assert relative_error(ours_step.chosen_logps, trl_step.chosen_logps) <= 1e-5  # the chosen branch is untouched
    assert relative_error(ours_step.rejected_logps, trl_step.rejected_logps) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)
