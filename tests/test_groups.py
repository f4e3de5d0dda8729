"""Groups: several pairs of one prompt in a batch share it, and a response they share runs once. Against
trl.DPOTrainer on the same batch, float32 on CPU: loss, per-pair log-probs, every gradient and TRL's metrics.

The data is ``embedded.make_grouped_preference_dataset``: K responses per prompt and all their pairs, so that every
response appears in K - 1 pairs. The mutation tests show the comparison fails when a response sees another response
of its group, or when a response's positions do not restart after the prompt.
"""

import mutations
import pytest
import torch
import trl.trainer.utils as trl_utils
from datasets import Dataset
from dpo_harness import (
    StepResult,
    assert_flex_forward_matches,
    assert_same_step,
    make_trainers,
    relative_error,
    responses_per_document,
    train_step,
    tree_tokens,
)

from collators import layout_sizes
from embedded import make_grouped_preference_dataset
from packing import row_tokens
from preference_data import normalize_schema


def grouped_rows(num_prompts: int = 2, responses: int = 4, conversational: bool = True, seed: int = 0) -> Dataset:
    """Short conversations (the tests run many forwards), ``responses`` per prompt, all pairs."""
    dataset = make_grouped_preference_dataset(
        num_prompts,
        responses,
        seed=seed,
        conversational=conversational,
        prompt_words=(20, 70),
        response_words=(4, 24),
        turns=(1, 2),
    )
    return normalize_schema(dataset) if conversational else dataset


def token_counts(examples: list[dict]) -> dict[str, int]:
    """Standard DPO, pairwise prefix sharing, groups (each prompt once, each distinct response once) and the tree of
    each prompt's sequences (a start that responses share also once)."""
    prompts: dict[tuple, set] = {}
    for example in examples:
        responses = prompts.setdefault(tuple(example["prompt_ids"]), set())
        responses.update({tuple(example["chosen_ids"]), tuple(example["rejected_ids"])})
    return {
        "standard": sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples),
        "pairwise": sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples),
        "grouped": sum(len(prompt) + sum(map(len, responses)) for prompt, responses in prompts.items()),
        "tree": sum(
            tree_tokens([prompt + response for response in responses]) for prompt, responses in prompts.items()
        ),
    }


def compare(dataset: Dataset, **kwargs) -> StepResult:
    trl_trainer, ours = make_trainers(dataset, **kwargs)
    step = train_step(ours)
    shared = step.batch["shared_inputs"]
    documents = sum(len(set(row.tolist()) - {-1}) for row in shared["sequence_ids"])
    assert documents < len(dataset), "the batch must hold groups of several pairs"
    assert responses_per_document(shared) > 2, "a group must hold more than two responses"
    assert_same_step(step, train_step(trl_trainer))
    return step


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_groups_match_trl(attn_implementation, data):
    compare(grouped_rows(conversational=data == "conversational"), attn_implementation=attn_implementation)


def test_tokens_computed_is_the_grouped_bound():
    """``tokens/computed`` counts each prompt once per group and each distinct response once, a start that
    responses share once too (the tree of the group's sequences): at most the grouped bound, below pairwise prefix
    sharing; ``tokens/standard_dpo`` is standard DPO's count."""
    dataset = grouped_rows(num_prompts=3, responses=4)
    _, ours = make_trainers(dataset)
    step = train_step(ours)
    counts = token_counts(list(ours.train_dataset))
    assert (
        step.metrics["tokens/computed"]
        == counts["tree"]
        <= counts["grouped"]
        < counts["pairwise"]
        < counts["standard"]
    )
    assert step.metrics["tokens/standard_dpo"] == counts["standard"]
    # 4 responses, 6 pairs per prompt: grouped = P + 4 mean responses, pairwise = 6 P + 12 mean responses.
    assert counts["pairwise"] / counts["grouped"] > 3


@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_packed_groups_match_trl(data):
    """Packed rows holding whole groups and parts of groups (pairs of one prompt in two rows share within each)."""
    dataset = grouped_rows(num_prompts=3, responses=3, conversational=data == "conversational")
    _, probe = make_trainers(dataset)
    sizes = layout_sizes(list(probe.train_dataset))
    groups = [sizes[i : i + 3] for i in range(0, len(sizes), 3)]
    length = max(row_tokens(group) for group in groups) + 8  # one group, or parts of two, per row
    step = compare(dataset, packing_length=length)
    assert step.batch["shared_inputs"]["input_ids"].shape[1] == length


@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": ["ipo"]},
        {"loss_type": ["hinge"]},
        {"loss_type": ["sppo_hard"]},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    ],
    ids=["ipo", "hinge", "sppo_hard", "sigmoid+sft"],
)
def test_group_loss_types(config):
    compare(grouped_rows(conversational=False), **config)


def test_groups_with_precomputed_reference(tmp_path):
    compare(grouped_rows(), reference="precompute", tmp_path=tmp_path)


def test_groups_flex_attention_forward(fresh_compiler):
    trl_trainer, ours = make_trainers(grouped_rows())
    assert_flex_forward_matches(trl_trainer, ours)


def test_head_scores_each_distinct_read_once(monkeypatch):
    """Pairs (a, b), (a, c), (c, b) of one prompt: the LM head scores each distinct (state, label) once, for the
    policy and the reference, and the loss, log-probs, gradients and metrics are still TRL's."""
    a, b, c = " The river runs north past the mill.", " North.", " It runs south to the sea, then east."
    pairs = ((a, b), (a, c), (c, b))
    prompt = "Which way does the river run?"
    dataset = Dataset.from_list([{"prompt": prompt, "chosen": x, "rejected": y} for x, y in pairs])
    trl_trainer, ours = make_trainers(dataset)
    head_rows: list[int] = []
    chunked = trl_utils._ChunkedLogProbFunction

    def counting_apply(hidden_states, *args):
        head_rows.append(len(hidden_states))
        return original_apply(hidden_states, *args)

    original_apply = chunked.apply
    monkeypatch.setattr(chunked, "apply", counting_apply)
    step = train_step(ours)
    monkeypatch.undo()
    # A read is the context a token is predicted from (prompt and the response before it) and the token.
    examples = list(ours.train_dataset)
    responses = [example[column] for example in examples for column in ("chosen_ids", "rejected_ids")]
    prompt_ids = examples[0]["prompt_ids"]
    reads = {(tuple(prompt_ids + response[:i]), token) for response in responses for i, token in enumerate(response)}
    # Each of the three responses is held by two pairs: at most half the standard reads are distinct.
    assert len(set(map(tuple, responses))) == 3 and len(reads) <= sum(map(len, responses)) // 2
    assert len(step.batch["shared_inputs"]["score_index"]) == len(reads)
    assert head_rows and set(head_rows) == {len(reads)}, head_rows
    assert_same_step(step, train_step(trl_trainer))


@pytest.mark.parametrize("mutation", ["responses_see_each_other", "positions_continue"])
def test_comparison_fails_on_a_wrong_group_layout(mutation, monkeypatch):
    trl_trainer, ours = make_trainers(grouped_rows())
    transform = None
    if mutation == "responses_see_each_other":
        mutations.responses_see_each_other(monkeypatch)
    else:
        transform = mutations.positions_continue
    ours_step, trl_step = train_step(ours, transform), train_step(trl_trainer)
    both = torch.cat([ours_step.chosen_logps, ours_step.rejected_logps])
    expected = torch.cat([trl_step.chosen_logps, trl_step.rejected_logps])
    assert relative_error(both, expected) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)


# --- --group_by_prefix through the Trainer's own dataloader ----------------------------------------------------------


def pairs_of(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt + chosen, prompt + rejected) of every pair in a collated batch, padding stripped."""
    half = len(batch["input_ids"]) // 2
    rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    sequences = [tuple(ids[mask.bool()].tolist()) for ids, mask in rows]
    return list(zip(sequences[:half], sequences[half:], strict=True))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_group_by_prefix_batches_whole_groups_and_every_pair_once(packed, tmp_path):
    """Shuffled pairs of 4 prompts (6 pairs each, one group cut short): batches of up to 8 pairs (unpacked), or of one
    row as long as the largest group (packed), keep every group whole, and an epoch trains every pair once."""
    dataset = grouped_rows(num_prompts=4, responses=4).select(range(20)).shuffle(seed=3)
    _, probe = make_trainers(dataset)
    examples = list(probe.train_dataset)
    by_prompt: dict[tuple[int, ...], list] = {}
    for example, size in zip(examples, layout_sizes(examples), strict=True):
        by_prompt.setdefault(tuple(example["prompt_ids"]), []).append(size)
    length = max(row_tokens(sizes) for sizes in by_prompt.values()) if packed else None
    _, ours = make_trainers(dataset, tmp_path=tmp_path, packing_length=length, group_by_prefix=True)
    ours.args.per_device_train_batch_size = ours._train_batch_size = 1 if packed else 8
    pairs = pairs_of(ours.data_collator(examples))
    group_of = {pair: tuple(e["prompt_ids"]) for e, pair in zip(examples, pairs, strict=True)}
    seen = []
    for batch in ours.get_train_dataloader():
        pairs = pairs_of(batch)
        groups = {group_of[pair] for pair in pairs}
        assert len(pairs) == sum(len(by_prompt[group]) for group in groups) <= 8, "a batch holds whole groups"
        shared = batch["shared_inputs"]
        # Packed: the loader's one row. Unpacked: a row per group, padded to a power of two, not to 8 pair rows.
        assert len(shared["input_ids"]) == (1 if packed else 1 << (len(groups) - 1).bit_length())
        # A row per group (unpacked) or one row (packed), each the prefix tree of its sequences: each prompt runs
        # once in the batch.
        trees = [pairs] if packed else [[pair for pair in pairs if group_of[pair] == group] for group in groups]
        computed = sum(tree_tokens([sequence for pair in tree for sequence in pair]) for tree in trees)
        assert int((shared["sequence_ids"] >= 0).sum()) == computed
        seen += pairs
    assert sorted(seen) == sorted(group_of)
