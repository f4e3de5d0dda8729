"""Runs TRL's RewardTrainer and PrefixRewardTrainer on the same pairs and collects what must agree: the reward
counterpart of ``dpo_harness`` (float32 on CPU, the same context-sensitive initialization and tolerance), built on its
shared pieces."""

import copy
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from dpo_harness import (
    CONTEXT_SENSITIVE_INIT,
    RTOL,
    assert_each_close,
    assert_same_grads,
    backward_step,
    build_pair,
    layout_flags,
    relative_error,
)
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from embedded import load_tokenizer, make_grouped_preference_dataset, tiny_model_config
from preference_data import normalize_schema
from prefix_reward_trainer import PrefixRewardConfig, PrefixRewardTrainer


@dataclass
class RewardStep:
    loss: torch.Tensor
    rewards: torch.Tensor
    grads: dict[str, torch.Tensor]
    metrics: dict[str, float]
    batch: dict[str, Any]


def reward_rows(conversational: bool = True, margin: bool = False, num_prompts: int = 2) -> Dataset:
    """3 responses per prompt and their 3 pairs: every response in two pairs."""
    dataset = make_grouped_preference_dataset(
        num_prompts, 3, conversational=conversational, prompt_words=(20, 70), response_words=(4, 24), turns=(1, 2)
    )
    if conversational:
        dataset = normalize_schema(dataset)  # TRL's RewardTrainer cannot read the Capybara `prompt` column
    if margin:
        dataset = dataset.add_column("margin", [0.25 * (i % 4) for i in range(len(dataset))])
    return dataset


def reward_model(attn_implementation: str) -> torch.nn.Module:
    config = tiny_model_config("llama", num_labels=1, initializer_range=CONTEXT_SENSITIVE_INIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    return model


def make_reward_trainers(
    dataset: Dataset,
    attn_implementation: str = "sdpa",
    prefix_sharing: bool = True,
    packing_length: int | None = None,
    group_by_prefix: bool = False,
    tokenizer=None,
    tmp_path=None,
    ours_attn_implementation: str | None = None,
    **config: Any,
) -> tuple[RewardTrainer, PrefixRewardTrainer]:
    """``ours_attn_implementation`` gives our side another attention backend than TRL's (flex_attention on a GPU)."""
    model = reward_model(attn_implementation)
    tokenizer = tokenizer or load_tokenizer()
    common = dict(
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=config.pop("per_device_train_batch_size", None) or len(dataset),
        max_length=None,
        **config,
    )

    def models(trainer_cls: type[RewardTrainer]) -> dict[str, Any]:
        copied = copy.deepcopy(model)
        if trainer_cls is PrefixRewardTrainer and ours_attn_implementation is not None:
            copied.set_attn_implementation(ours_attn_implementation)
        return dict(model=copied, train_dataset=dataset, processing_class=copy.copy(tokenizer))

    return build_pair(
        ((RewardTrainer, RewardConfig), (PrefixRewardTrainer, PrefixRewardConfig)),
        common,
        layout_flags(prefix_sharing, packing_length, group_by_prefix),
        tmp_path,
        models,
    )


def reward_step(trainer: RewardTrainer, batch_transform=None) -> RewardStep:
    """One loss + backward on the whole (tokenized) training set as a single batch (``dpo_harness.backward_step``)."""
    loss, outputs, grads, metrics, batch = backward_step(trainer, None, batch_transform, return_outputs=True)
    return RewardStep(loss, outputs.logits.detach(), grads, metrics, batch)


def assert_same_reward_step(ours: RewardStep, trl: RewardStep, rtol: float = RTOL) -> None:
    assert relative_error(ours.loss, trl.loss) <= rtol, (ours.loss, trl.loss)
    # Every reward, and every metric (all statistics of rewards), to the tolerance of the largest reward.
    scale = trl.rewards.abs().max().item()
    assert_each_close(ours.rewards, trl.rewards, rtol, scale)
    assert_same_grads(ours.grads, trl.grads, rtol)
    for key, value in trl.metrics.items():
        assert abs(ours.metrics[key] - value) <= rtol * (abs(value) + scale) + 1e-6, (key, ours.metrics[key], value)
