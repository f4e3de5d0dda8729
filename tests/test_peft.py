"""LoRA against trl.DPOTrainer with the same LoRA config and the same random adapters, float32 on CPU.

The reference is the policy with its adapters disabled, as PEFT training runs it. Loss, the gradient of every LoRA
weight, TRL's metrics (the policy's mean log-probs and rewards among them) and the per-sequence reference log-probs
must agree to dpo_harness's tolerance: under activation checkpointing (non-reentrant and reentrant), with packed rows,
and with precomputed reference log-probs (unpacked and packed).
"""

import pytest
import torch
from dpo_harness import (
    StepResult,
    assert_each_close,
    assert_same_step,
    conversations,
    enable_activation_checkpointing,
    lora_config,
    make_trainers,
    train_step,
)

PACKING_LENGTH = 384  # two or three of these conversations a row


def compare_lora_steps(trl_trainer, ours) -> StepResult:
    """One step of each on the whole training set; returns ours."""
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert "shared_inputs" in ours_step.batch, "prefix sharing was not used"
    assert_same_step(ours_step, trl_step)
    assert ours_step.grads and all("lora_" in name for name in ours_step.grads)
    assert trl_step.metrics["rewards/margins"] != 0  # the adapters make the policy differ from the reference
    return ours_step


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_lora_with_activation_checkpointing(use_reentrant):
    trl_trainer, ours = make_trainers(
        conversations(),
        peft_config=lora_config(),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    forwards = {}
    for trainer in (trl_trainer, ours):
        enable_activation_checkpointing(trainer)
        calls = forwards[type(trainer).__name__] = []
        # Inside the checkpointed forward (a decoder layer's own hooks run outside it, once).
        attention = trainer.model.get_base_model().model.layers[0].self_attn
        attention.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
    compare_lora_steps(trl_trainer, ours)
    # The policy forward, its recomputation in the backward, and the two reference forwards (in the loss and in
    # train_step's log-probs, adapters disabled, checkpointing off): without checkpointing it would be three.
    assert forwards == {"DPOTrainer": [1] * 4, "PrefixDPOTrainer": [1] * 4}


def test_lora_with_packing():
    trl_trainer, ours = make_trainers(conversations(6), peft_config=lora_config(), packing_length=PACKING_LENGTH)
    shared = compare_lora_steps(trl_trainer, ours).batch["shared_inputs"]
    assert shared["input_ids"].shape[1] == PACKING_LENGTH and len(shared["input_ids"]) < 6, "rows hold several"


@pytest.mark.parametrize("packing_length", [None, PACKING_LENGTH], ids=["unpacked", "packed"])
def test_lora_with_precomputed_reference_log_probs(packing_length, tmp_path):
    trl_trainer, ours = make_trainers(
        conversations(6),
        peft_config=lora_config(),
        reference="precompute",
        packing_length=packing_length,
        tmp_path=tmp_path,
    )
    for column in ("ref_chosen_logps", "ref_rejected_logps"):  # computed once, with the adapters disabled
        assert_each_close(torch.tensor(ours.train_dataset[column]), torch.tensor(trl_trainer.train_dataset[column]))
    batch = compare_lora_steps(trl_trainer, ours).batch
    assert "ref_chosen_logps" in batch and ours.ref_model is None
