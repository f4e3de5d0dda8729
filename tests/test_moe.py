"""Mixture-of-experts models (Qwen3-MoE, Mixtral, GPT-OSS, DeepSeek-V3) with prefix sharing and packing, against
trl.DPOTrainer.

Routing is per token, so with the router load-balancing loss off the DPO loss, log-probs, gradients and metrics are
TRL's (float32, relative error 1e-5). With it on, the loss is computed over the tokens the forward ran
(``prefix_dpo_trainer.router_aux_loss``): with prefix sharing each token of a row's prefix tree once (each prompt
token once, where TRL counts it twice); packed without sharing, the same tokens as TRL. Both values are checked
against the formula applied to the router logits of TRL's own standard-layout forward, and so are the loss and every
gradient that follow from them.
"""

import pytest
import torch
from dpo_harness import assert_same_step, conversations, make_trainers, relative_error, train_step

from prefix_dpo_trainer import router_aux_loss

QWEN3_MOE = ("qwen3_moe", "sdpa")
MIXTRAL = ("mixtral", "sdpa")
GPT_OSS = ("gpt_oss", "eager")  # attention sinks and sliding windows; transformers has no sdpa path for GPT-OSS
DEEPSEEK_V3 = ("deepseek_v3", "sdpa")  # no auxiliary loss: DeepSeek-V3 balances its experts with router biases
COEF = 0.05  # larger than the configs' 0.001, so that the auxiliary term is visible in the loss and the gradients
PACKING_LENGTH = 384  # two or three examples a row


@pytest.mark.parametrize(
    "model, packing_length",
    [
        (QWEN3_MOE, None),
        (QWEN3_MOE, PACKING_LENGTH),
        (MIXTRAL, PACKING_LENGTH),
        (GPT_OSS, PACKING_LENGTH),
        (DEEPSEEK_V3, PACKING_LENGTH),
    ],
    ids=[
        "qwen3-moe-sharing",
        "qwen3-moe-sharing+packing",
        "mixtral-sharing+packing",
        "gpt-oss-sharing+packing",
        "deepseek-v3-sharing+packing",
    ],
)
def test_moe_dpo_loss_is_exact_with_the_aux_loss_off(model, packing_length):
    model_type, attn_implementation = model
    trl_trainer, ours = make_trainers(
        conversations(),
        model_type=model_type,
        attn_implementation=attn_implementation,
        packing_length=packing_length,
        router_aux_loss_coef=0.0,
    )
    ours_step = train_step(ours)
    rows = len(ours_step.batch["shared_inputs"]["input_ids"])
    assert rows < 4 if packing_length else rows == 4
    assert_same_step(ours_step, train_step(trl_trainer))


def standard_layout_aux_losses(trl_trainer, batch, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The auxiliary loss over TRL's standard batch: as TRL weights it (every non-padding token, so each prompt
    twice) and over the tokens the shared layout runs: of the sequences of each layout row (``rows``: example indices),
    one occurrence of each distinct prefix, whose router logits are the same wherever it occurs."""
    model = trl_trainer.model
    outputs = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    )
    tokens = batch["attention_mask"].bool()
    once = torch.zeros_like(tokens)
    pairs = len(tokens) // 2
    for row in rows:
        seen: set[tuple[int, ...]] = set()
        for sequence in [*row, *(pairs + index for index in row)]:
            ids = batch["input_ids"][sequence].tolist()
            held = tokens[sequence].nonzero().flatten().tolist()
            for count, position in enumerate(held, start=1):
                prefix = tuple(ids[at] for at in held[:count])
                once[sequence, position] = prefix not in seen
                seen.add(prefix)
    return (
        router_aux_loss(outputs.router_logits, model.config, tokens),
        router_aux_loss(outputs.router_logits, model.config, once),
    )


@pytest.mark.parametrize(
    "model, prefix_sharing",
    [(QWEN3_MOE, True), (QWEN3_MOE, False), (GPT_OSS, True)],
    ids=["qwen3-moe-sharing+packing", "qwen3-moe-packing", "gpt-oss-sharing+packing"],
)
def test_aux_loss_is_computed_over_the_tokens_the_forward_ran(model, prefix_sharing):
    model_type, attn_implementation = model
    trl_trainer, ours = make_trainers(
        conversations(),
        model_type=model_type,
        attn_implementation=attn_implementation,
        prefix_sharing=prefix_sharing,
        packing_length=PACKING_LENGTH,
        router_aux_loss_coef=COEF,
    )
    assert ours.aux_loss_enabled
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)

    # TRL's term and the documented one, with the gradients each puts on the policy.
    trl_trainer.model.zero_grad()
    examples = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
    trl_aux, once_aux = standard_layout_aux_losses(
        trl_trainer, trl_step.batch, ours.data_collator.layout_rows(examples)
    )
    params = [p for p in trl_trainer.model.parameters() if p.requires_grad]
    trl_aux_grads = torch.autograd.grad(trl_aux, params, retain_graph=True, allow_unused=True)
    once_aux_grads = torch.autograd.grad(once_aux, params, allow_unused=True)
    expected_aux = once_aux if prefix_sharing else trl_aux
    expected_aux_grads = once_aux_grads if prefix_sharing else trl_aux_grads

    assert abs(trl_step.metrics["aux_loss"] - trl_aux.item()) <= 1e-5 * trl_aux.item()
    assert abs(ours_step.metrics["aux_loss"] - expected_aux.item()) <= 1e-5 * expected_aux.item()
    if prefix_sharing:  # the difference is real, 5x the tolerance above, so the check can tell the two values apart
        assert relative_error(once_aux, trl_aux) > 5e-5
    expected_loss = trl_step.loss - COEF * trl_aux.detach() + COEF * expected_aux.detach()
    assert relative_error(ours_step.loss, expected_loss) <= 1e-5

    names = [name for name, p in trl_trainer.model.named_parameters() if p.requires_grad]
    moved_by_sharing = []
    for name, trl_aux_grad, expected_aux_grad in zip(names, trl_aux_grads, expected_aux_grads, strict=True):
        expected = trl_step.grads[name].clone()
        if trl_aux_grad is not None:  # the router and the layers below it
            expected += COEF * (expected_aux_grad - trl_aux_grad)
            moved_by_sharing.append(relative_error(expected, trl_step.grads[name]) > 1e-4)
        assert relative_error(ours_step.grads[name], expected) <= 1e-5, name
    assert any(moved_by_sharing) == prefix_sharing
    if not prefix_sharing:  # the same tokens ran: everything, the auxiliary loss included, is TRL's
        assert_same_step(ours_step, trl_step)
