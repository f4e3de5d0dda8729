"""PrefixRewardTrainer against trl.RewardTrainer on the same batch, float32 on CPU.

Loss (with and without ``margin``, with ``center_rewards_coefficient``), every reward, every parameter gradient and
TRL's logged metrics must agree to a relative error of 1e-5, on conversational and plain-text data where several pairs
share a prompt and responses (grouped), unpacked and packed, sdpa and eager, plus FlexAttention's forward. A mutation
test shows the comparison fails when a response sees another response.
"""

import mutations
import pytest
import torch
from datasets import Dataset
from dpo_harness import RTOL, relative_error, responses_per_document
from reward_harness import RewardStep, assert_same_reward_step, make_reward_trainers, reward_rows, reward_step

from collators import layout_sizes, split_common_prefixes
from embedded import load_tokenizer
from packing import row_tokens


def compare(dataset: Dataset, **kwargs) -> RewardStep:
    trl_trainer, ours = make_reward_trainers(dataset, **kwargs)
    step = reward_step(ours)
    assert "shared_inputs" in step.batch, "prefix sharing was not used"
    assert_same_reward_step(step, reward_step(trl_trainer))
    return step


@pytest.mark.parametrize(
    "option", ["plain_loss", "margin", "center_rewards"], ids=["no-margin", "margin", "center_rewards_coefficient"]
)
@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_rewards_match_trl(data, option):
    dataset = reward_rows(conversational=data == "conversational", margin=option == "margin")
    config = {"center_rewards_coefficient": 0.01} if option == "center_rewards" else {}
    step = compare(dataset, **config)
    shared = step.batch["shared_inputs"]
    # Groups: one row (one prompt) per group of 3 pairs, 3 distinct responses each, each scored once for two pairs.
    assert len(shared["input_ids"]) == 2 and responses_per_document(shared) == 3
    assert len(shared["score_index"]) == 6 and len(shared["score_inverse"]) == 12
    assert step.metrics["tokens/computed"] < step.metrics["tokens/standard"] / 3


def test_rewards_match_trl_eager():
    compare(reward_rows(margin=True), attn_implementation="eager", center_rewards_coefficient=0.01)


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared", "unshared"])
def test_packed_rewards_match_trl(prefix_sharing):
    dataset = reward_rows(num_prompts=3)
    _, probe = make_reward_trainers(dataset)
    examples = split_common_prefixes(list(probe.train_dataset))
    length = max(row_tokens(layout_sizes(examples[i : i + 3], prefix_sharing)) for i in range(0, 9, 3)) + 8
    step = compare(dataset, prefix_sharing=prefix_sharing, packing_length=length)
    assert step.batch["shared_inputs"]["input_ids"].shape[1] == length
    assert 1 < len(step.batch["shared_inputs"]["input_ids"]) < len(dataset)


def test_reward_read_at_the_last_token_that_is_not_padding():
    """With eos as the padding token, TRL's classifier reads each reward before the trailing eos: so does ours."""
    tokenizer = load_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    step = compare(reward_rows(conversational=False), tokenizer=tokenizer)
    shared, eos = step.batch["shared_inputs"], tokenizer.eos_token_id
    read = shared["input_ids"].flatten()[shared["score_index"]]
    assert (read != eos).all()


def test_reward_flex_attention_forward(fresh_compiler):
    trl_trainer, ours = make_reward_trainers(reward_rows())
    ours.model.set_attn_implementation("flex_attention")
    examples = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
    with torch.no_grad():
        rewards = ours.model(**ours.data_collator(examples), use_cache=False).logits
        expected = trl_trainer.model(**trl_trainer.data_collator(examples), use_cache=False).logits
    assert relative_error(rewards, expected) <= RTOL


def test_comparison_fails_when_a_response_sees_another(monkeypatch):
    trl_trainer, ours = make_reward_trainers(reward_rows())
    mutations.responses_see_each_other(monkeypatch)
    ours_step, trl_step = reward_step(ours), reward_step(trl_trainer)
    assert relative_error(ours_step.rewards, trl_step.rewards) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_reward_step(ours_step, trl_step)


def test_group_by_prefix_reward_training_loop(tmp_path):
    """Through Trainer's own loader: shuffled pairs, batches of whole groups, every pair once; a short training run."""
    dataset = reward_rows(num_prompts=4).shuffle(seed=1)
    _, ours = make_reward_trainers(dataset, tmp_path=tmp_path, group_by_prefix=True, max_steps=2, logging_steps=1)
    ours.args.per_device_train_batch_size = ours._train_batch_size = 6
    batches, pad = list(ours.get_train_dataloader()), ours.processing_class.pad_token_id
    assert [len(batch["input_ids"]) // 2 for batch in batches] == [6, 6]  # two whole groups of 3 pairs each
    for batch in batches:
        used_rows = (batch["shared_inputs"]["sequence_ids"] >= 0).any(dim=1)
        assert int(used_rows.sum()) == 2, "one row per prompt"
    pairs = [
        (tuple(chosen[chosen != pad].tolist()), tuple(rejected[rejected != pad].tolist()))
        for batch in batches
        for chosen, rejected in zip(batch["input_ids"][:6], batch["input_ids"][6:], strict=True)
    ]
    assert len(set(pairs)) == len(pairs) == len(dataset)
    ours.train()
    assert ours.tokens_computed < ours.tokens_standard / 3
