"""Padding never produces NaN or Inf: loss, log-probs and every gradient stay finite on heavily padded batches.

Batches: one long example beside one-token prompts and responses, laid out (a) one example per row padded to a
multiple of 128, (b) packed, with and without prefix sharing, into a row that is mostly padding; and a row that is
all padding. Each in float32, bf16 autocast on the CPU and a bf16 model, with sdpa and eager attention (eager adds a
``finfo.min`` mask in the model's dtype, the case where bf16 could overflow).
"""

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from dpo_harness import CONTEXT_SENSITIVE_INIT, perturbed_copy, relative_error
from trl.trainer.utils import add_fused_lm_head

from collators import attention_mask_for, build_shared_inputs
from embedded import load_tokenizer, tiny_model
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

ROWS = [
    {
        "prompt": "Write one word about the sea. " * 12,
        "chosen": " deep and cold and dark and wide" * 4,
        "rejected": " blue",
    },
    {"prompt": "", "chosen": "", "rejected": "a"},  # prompt: BOS only; chosen: EOS only
    {"prompt": "", "chosen": "b", "rejected": ""},
    {"prompt": "Q", "chosen": "", "rejected": "c"},
]
LAYOUTS = {
    "shared-rows-pad-128": {"prefix_sharing": True},
    "packed-shared-mostly-padding": {"prefix_sharing": True, "enable_packing": True, "packing_length": "1024"},
    "packed-unshared-mostly-padding": {"prefix_sharing": False, "enable_packing": True, "packing_length": "1024"},
}
PRECISIONS = ("float32", "bf16-autocast", "bf16-model")


def make_trainer(attn_implementation: str, layout: dict) -> PrefixDPOTrainer:
    policy = tiny_model("llama", initializer_range=CONTEXT_SENSITIVE_INIT, attn_implementation=attn_implementation)
    args = PrefixDPOConfig(output_dir="/tmp/prefix-dpo-tests", report_to="none", bf16=False, max_length=None, **layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrefixDPOTrainer(
            model=policy,
            ref_model=perturbed_copy(policy),
            args=args,
            train_dataset=Dataset.from_list(ROWS),
            processing_class=load_tokenizer(),
        )
    if not trainer.packs:
        trainer.data_collator.shared_pad_to_multiple_of = 128
    return trainer


def step(trainer: PrefixDPOTrainer, batch: dict, precision: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    trainer.model.train()
    trainer.model.zero_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    with autocast:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), torch.cat([chosen, rejected]).detach(), grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gradients_finite_on_heavily_padded_batches(attn_implementation: str, layout: str) -> None:
    trainer = make_trainer(attn_implementation, LAYOUTS[layout])
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    lengths = sorted(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    assert lengths[0] <= 4 < 100 < lengths[-1]  # one-token prompts and responses beside a long example
    batch = trainer.data_collator(examples)
    shared = batch["shared_inputs"]
    padding_share = (shared["sequence_ids"] < 0).float().mean().item()
    assert padding_share > (0.5 if trainer.packs else 0.6), padding_share
    results = {}
    for precision in PRECISIONS:
        if precision == "bf16-model":
            trainer.model.to(torch.bfloat16)
            trainer.ref_model.to(torch.bfloat16)
        loss, logps, grads = step(trainer, copy.deepcopy(batch), precision)
        assert torch.isfinite(loss), (precision, loss)
        assert torch.isfinite(logps).all(), (precision, logps)
        assert len(grads) == len(list(trainer.model.parameters()))
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), (precision, name)
        assert sum(grad.float().norm() for grad in grads.values()) > 0
        results[precision] = logps.float()
    # bf16 changes the numbers, not their meaning: the sequence log-probs stay close to float32's.
    for precision in PRECISIONS[1:]:
        assert relative_error(results[precision], results["float32"]) < 0.05, precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_all_padding_row_stays_finite(attn_implementation: str, dtype: torch.dtype) -> None:
    """A row with no example at all (only padding) beside a real one: finite outputs and gradients."""
    model = tiny_model("llama", initializer_range=CONTEXT_SENSITIVE_INIT, attn_implementation=attn_implementation)
    model.to(dtype).train()
    add_fused_lm_head(model)
    example = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]}
    shared = build_shared_inputs([example], [[0]], pad_token_id=0, pad_to_multiple_of=128, num_rows=2)
    assert (shared["sequence_ids"][1] < 0).all()
    mask = attention_mask_for(shared, model.config, dtype)
    hidden = model.model(input_ids=shared["input_ids"], position_ids=shared["position_ids"], attention_mask=mask)
    states = hidden.last_hidden_state
    assert torch.isfinite(states).all()
    logits = model.lm_head(states.flatten(0, 1)[shared["score_index"]]).float()
    labels = torch.tensor([8, 9, 10])
    loss = torch.nn.functional.cross_entropy(logits, labels) + 0 * states.sum()  # padding states join the graph
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
