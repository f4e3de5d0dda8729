"""Prefix trees across the examples of a row: every shared prefix runs once, and training is still TRL's exactly.

The layout (``collators._lay_out_row``) is checked from the mask alone: each token's state depends on exactly the
tokens of one standard sequence's prefix, every standard read is taken at its own prefix, and, with prefix sharing,
no prefix of a row runs twice (hand-drawn, then random trees with a tiny vocabulary, so that sequences share starts,
a response is a prefix of the other or equal to it, and prompts extend earlier sequences).

Against trl.DPOTrainer and trl.RewardTrainer, float32 on CPU (loss, per-sequence log-probs or rewards, every
gradient, TRL's metrics): conversations whose prompts all start with one long system message and then differ, with a
pair whose responses share their first tokens, a pair whose chosen is a prefix of its rejected, and the three turns
of one conversation as one example each; unpacked (one tree for the whole batch) and packed, sdpa and eager, and the
flex_attention forward. Mutation tests show that the comparison fails when the trie merges two different tokens, or
nodes at different depths.
"""

import functools
import random

import mutations
import pytest
import torch
from datasets import Dataset
from dpo_harness import (
    assert_flex_forward_matches,
    assert_same_step,
    make_trainers,
    relative_error,
    train_step,
    tree_tokens,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import scoring_model
from test_reward import compare as compare_rewards
from test_reward import make_reward_trainers

import collators
from collators import (
    MIN_SHARED_PREFIX,
    PADDING_SEQUENCE,
    RESPONSES,
    PrefixSharingCollator,
    build_shared_inputs,
    dense_mask,
    prompt_rows,
    shared_sequence_length,
)

PAD = 0

# --- the layout, from the mask alone -------------------------------------------------------------------------------


def contexts(shared: dict[str, torch.Tensor]) -> dict[int, tuple[int, ...]]:
    """For each real token (by flat index), the tokens its state depends on, read from the mask and checked to be a
    causal prefix: a token at position 0 sees only itself; any other one sees one key per earlier position, its
    parent (the key at the position before its own) and exactly what its parent sees. Its context is then its
    parent's and its own token."""
    mask = dense_mask(shared)[:, 0]
    ids, positions = shared["input_ids"].tolist(), shared["position_ids"].tolist()
    rows, length = shared["input_ids"].shape
    found: dict[int, tuple[int, ...]] = {}
    for row in range(rows):
        seen_by: dict[int, set[int]] = {}
        for query in range(length):
            if shared["sequence_ids"][row, query] == PADDING_SEQUENCE:
                continue
            seen = set(mask[row, query].nonzero().flatten().tolist()) - {query}
            position = positions[row][query]
            assert sorted(positions[row][key] for key in seen) == list(range(position)), (row, query)
            context: tuple[int, ...] = ()
            if position:
                parent = next(key for key in seen if positions[row][key] == position - 1)
                assert seen == seen_by[parent] | {parent}, (row, query)
                context = found[row * length + parent]
            seen_by[query] = seen
            found[row * length + query] = (*context, ids[row][query])
    return found


def sequences_of(examples: list[dict], row: list[int]) -> list[list[int]]:
    return [examples[index]["prompt_ids"] + examples[index][column] for index in row for column in RESPONSES]


def assert_reads_their_prefixes(examples: list[dict], shared: dict[str, torch.Tensor], score: str) -> None:
    """Every standard read (TRL's order: chosen sequences, then rejected ones) is taken at the state of its own
    prefix: the predecessor of each completion token, or a sequence's last token that is not padding."""
    found = contexts(shared)
    states = shared["score_index"][shared["score_inverse"]].tolist()
    expected = []
    for column in RESPONSES:
        for example in examples:
            tokens = example["prompt_ids"] + example[column]
            if score == "next_token":
                expected += [tuple(tokens[:end]) for end in range(len(example["prompt_ids"]), len(tokens))]
            else:
                last = max((i for i, token in enumerate(tokens) if token != PAD), default=0)
                expected.append(tuple(tokens[: last + 1]))
    assert [found[state] for state in states] == expected


def assert_every_prefix_runs_once(examples: list[dict], rows: list[list[int]], shared: dict) -> None:
    """With prefix sharing, the contexts of a row's tokens are exactly the distinct prefixes of its sequences."""
    found = contexts(shared)
    length = shared["input_ids"].shape[1]
    for number, row in enumerate(rows):
        held = [context for flat, context in found.items() if flat // length == number]
        prefixes = {tuple(s[:end]) for s in sequences_of(examples, row) for end in range(1, len(s) + 1)}
        assert len(held) == len(set(held)) == tree_tokens(sequences_of(examples, row))
        assert set(held) == prefixes


# The docstring's tree: two prompts that start with a system prompt s0 s1, then differ (a0 / b0 b1); the first pair's
# responses share their first token x0.
S0, S1, A0, X0, X1, Y1, B0, B1, C0, R0, R1 = range(100, 111)
DRAWN = [
    {"prompt_ids": [S0, S1, A0], "chosen_ids": [X0, X1], "rejected_ids": [X0, Y1]},
    {"prompt_ids": [S0, S1, B0, B1], "chosen_ids": [C0], "rejected_ids": [R0, R1]},
]
DRAWN_PAIRS = [[e["prompt_ids"] + e[column] for column in RESPONSES] for e in DRAWN]
DRAWN_MASK = """
x
x x
x x x
x x x x
x x x x x
x x x x . x
x x . . . . x
x x . . . . x x
x x . . . . x x x
x x . . . . x x . x
x x . . . . x x . x x
"""


def test_hand_drawn_tree():
    """The module docstring's drawing: 11 tokens where standard DPO runs 21 and pairwise prefix sharing 14."""
    shared = build_shared_inputs(DRAWN, [[0, 1]], PAD)
    assert shared["input_ids"].tolist() == [[S0, S1, A0, X0, X1, Y1, B0, B1, C0, R0, R1]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4, 2, 3, 4, 4, 5]]
    assert shared["subtree_end"].tolist() == [[11, 11, 6, 6, 5, 6, 11, 11, 9, 11, 11]]
    assert shared["sequence_ids"].tolist() == [[0] * 11]
    drawn = [[cell == "x" for cell in line.split()] for line in DRAWN_MASK.strip().splitlines()]
    assert dense_mask(shared)[0, 0].tolist() == [row + [False] * (11 - len(row)) for row in drawn]
    # Reads, chosen then rejected: x0 <- a0, x1 <- x0; c0 <- b1; x0 <- a0 (read once), y1 <- x0; r0 <- b1, r1 <- r0
    assert shared["score_index"].tolist() == [2, 3, 7, 3, 7, 9]
    assert shared["score_inverse"].tolist() == [0, 1, 2, 0, 3, 4, 5]
    assert tree_tokens(sequences_of(DRAWN, [0, 1])) == 11
    assert_reads_their_prefixes(DRAWN, shared, "next_token")
    assert_every_prefix_runs_once(DRAWN, [[0, 1]], shared)


def test_pairwise_and_unshared_layouts_of_the_drawn_tree():
    """``group_prompts=False``: each pair its own tree (the first pair still runs x0 once); ``share_prompt=False``:
    each sequence its own document, 21 tokens."""
    pairwise = build_shared_inputs(DRAWN, [[0, 1]], PAD, group_prompts=False)
    assert pairwise["input_ids"].tolist() == [[S0, S1, A0, X0, X1, Y1, S0, S1, B0, B1, C0, R0, R1]]
    assert pairwise["sequence_ids"].tolist() == [[0] * 6 + [1] * 7]
    unshared = build_shared_inputs(DRAWN, [[0, 1]], PAD, share_prompt=False)
    assert unshared["sequence_ids"].tolist() == [[0] * 5 + [1] * 5 + [2] * 5 + [3] * 6]
    for shared in (pairwise, unshared):
        assert_reads_their_prefixes(DRAWN, shared, "next_token")


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="Example 1 has an empty prompt"):
        build_shared_inputs([DRAWN[0], {**DRAWN[1], "prompt_ids": []}], [[0, 1]], PAD)


def test_unpacked_rows_merge_prompts_that_share_a_long_prefix():
    system = list(range(200, 200 + MIN_SHARED_PREFIX))
    examples = [
        {"prompt_ids": system + [1], "chosen_ids": [2], "rejected_ids": [3]},
        {"prompt_ids": system[:-1] + [4], "chosen_ids": [2], "rejected_ids": [3]},  # one token short of sharing it
        {"prompt_ids": system + [5, 6], "chosen_ids": [2], "rejected_ids": [3]},
        {"prompt_ids": system[:-1] + [4], "chosen_ids": [7], "rejected_ids": [3]},  # the same prompt
    ]
    assert prompt_rows(examples) == [[0, 2], [1, 3]]
    collator = PrefixSharingCollator(pad_token_id=PAD)
    shared = collator.shared_inputs(examples, "next_token")
    # System prompt, then 1 -> (2, 3) and 5 6 -> (2, 3); the other prompt, then 2, 3 and 7.
    assert (shared["sequence_ids"] >= 0).sum(1).tolist() == [MIN_SHARED_PREFIX + 7, MIN_SHARED_PREFIX + 3]


@st.composite
def tree_cases(draw: st.DrawFn) -> dict:
    """Random pairs over 2-4 token ids: sequences share starts by chance, a prompt may repeat an earlier one or
    extend an earlier example's prompt and chosen response (the next turn), and a rejected response may equal the
    chosen one, be a prefix of it or extend it."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1), label="seed"))
    vocabulary = range(16, 16 + draw(st.integers(2, 4), label="vocabulary"))

    def tokens(low: int, high: int) -> list[int]:
        return [rng.choice(vocabulary) for _ in range(rng.randint(low, high))]

    examples: list[dict] = []
    for _ in range(draw(st.integers(1, 6), label="pairs")):
        prompt = tokens(1, 5)
        if examples and rng.random() < 0.5:
            earlier = rng.choice(examples)
            prompt = earlier["prompt_ids"] + (earlier["chosen_ids"] + tokens(0, 3) if rng.random() < 0.6 else [])
        chosen = tokens(1, 4)
        rejected = rng.choice([tokens(1, 4), chosen, chosen[: rng.randint(1, len(chosen))], chosen + tokens(1, 2)])
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    share_prompt = draw(st.booleans(), label="share_prompt")
    group_prompts = draw(st.booleans(), label="group_prompts")
    packing_length = None
    if draw(st.booleans(), label="packed"):
        packing_length = max(shared_sequence_length(e, share_prompt) for e in examples) + draw(st.integers(0, 20))
    collator = PrefixSharingCollator(
        pad_token_id=PAD,
        packing_length=packing_length,
        share_prompt=share_prompt,
        group_prompts=group_prompts,
        min_shared_prefix=draw(st.integers(1, 4), label="min_shared_prefix"),
    )
    return {"examples": examples, "collator": collator, "score": draw(st.sampled_from(["next_token", "last_token"]))}


@settings(max_examples=80, deadline=None, derandomize=True)
@given(tree_cases())
def test_random_trees_read_their_prefixes(case: dict) -> None:
    examples, collator = case["examples"], case["collator"]
    shared = collator.shared_inputs(examples, case["score"])
    assert_reads_their_prefixes(examples, shared, case["score"])
    rows = collator.layout_rows(examples)
    if collator.share_prompt and collator.group_prompts:
        assert_every_prefix_runs_once(examples, rows, shared)
    else:
        # One tree per pair, or one document per sequence.
        per_tree = [[e["prompt_ids"] + e[column] for column in RESPONSES] for e in examples]
        if not collator.share_prompt:
            per_tree = [[sequence] for pair in per_tree for sequence in pair]
        assert int((shared["sequence_ids"] >= 0).sum()) == sum(map(tree_tokens, per_tree))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tree_cases(), st.sampled_from(["sdpa", "eager"]))
def test_random_trees_log_probs_match_the_standard_forward(case: dict, attn_implementation: str) -> None:
    """TRL's fused head on the standard batch and on the tree layout, a tiny context-sensitive float32 Llama."""
    examples, collator = case["examples"], case["collator"]
    standard = collator(examples)
    shared_inputs = standard.pop("shared_inputs")
    model = scoring_model(attn_implementation)
    labels = standard["input_ids"].masked_fill(standard["completion_mask"] == 0, -100)
    inputs = {"input_ids": standard["input_ids"], "attention_mask": standard["attention_mask"], "labels": labels}
    with torch.no_grad():
        expected = model(**inputs, fused_lm_head=True, use_cache=False)
        ours = model(**inputs, shared_inputs=shared_inputs, fused_lm_head=True, use_cache=False)
    scored = labels[:, 1:] != -100
    torch.testing.assert_close(ours.log_probs[scored], expected.log_probs[scored], rtol=1e-5, atol=2e-5)


# --- against TRL ----------------------------------------------------------------------------------------------------

SYSTEM = (
    "You are the help desk of a small county library. Answer in one or two short sentences, in plain words, and "
    "never make up a book, a date or an opening time."
)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def conversations() -> list[tuple[list[dict[str, str]], str, str]]:
    """(prompt, chosen, rejected), every prompt starting with the system message: responses that share their first
    tokens; a chosen response that is a prefix of the rejected one (an eos inside the rejected text); and the three
    turns of one conversation, each prompt extending the one before by its chosen answer and the next question, whose
    first answer is also an earlier pair's chosen answer, under another prompt."""
    system = [{"role": "system", "content": SYSTEM}]
    turns = [
        ("Can I borrow three books at once?", "Yes.", "No."),
        ("And for how long?", "For three weeks.", "For a year."),
        ("Can I renew them?", "Yes, once, at the front desk.", "Never."),
    ]
    rows = [
        ([*system, user("Which prime comes after eleven?")], "The answer is 13.", "The answer is 12, as it is even."),
        ([*system, user("Does the library open on Sundays?")], "Yes.", "Yes.</s> No, wait: only on Saturdays."),
    ]
    history = list(system)
    for question, chosen, rejected in turns:
        history.append(user(question))
        rows.append((list(history), chosen, rejected))
        history.append(assistant(chosen))
    return rows


def dpo_rows() -> Dataset:
    return Dataset.from_list(
        [{"prompt": p, "chosen": [assistant(c)], "rejected": [assistant(r)]} for p, c, r in conversations()]
    )


def reward_rows() -> Dataset:
    return Dataset.from_list(
        [{"chosen": [*p, assistant(c)], "rejected": [*p, assistant(r)]} for p, c, r in conversations()]
    )


def packing_length(examples: list[dict]) -> int:
    """Room for two examples a row, so that a batch spans several rows, each holding a tree of several examples."""
    return 2 * max(shared_sequence_length(example) for example in examples)


@functools.cache
def trl_dpo_step(attn_implementation: str):
    """TRL's side of the comparisons, whatever our side's layout."""
    trl_trainer, _ = make_trainers(dpo_rows(), attn_implementation=attn_implementation)
    return train_step(trl_trainer)


def tree_layout_trainer(attn_implementation: str, packed: bool):
    length = None
    if packed:
        _, probe = make_trainers(dpo_rows())
        length = packing_length(list(probe.train_dataset))
    _, ours = make_trainers(dpo_rows(), attn_implementation=attn_implementation, packing_length=length)
    return ours


@pytest.mark.parametrize(
    ("attn_implementation", "packed"),
    [("sdpa", False), ("sdpa", True), ("eager", False)],
    ids=["sdpa-unpacked", "sdpa-packed", "eager-unpacked"],
)
def test_trees_match_trl(attn_implementation, packed):
    ours = tree_layout_trainer(attn_implementation, packed)
    examples = list(ours.train_dataset)
    step = train_step(ours)
    shared = step.batch["shared_inputs"]
    rows = ours.data_collator.layout_rows(examples)
    tree = sum(tree_tokens(sequences_of(examples, row)) for row in rows)
    assert step.metrics["tokens/computed"] == tree
    if packed:
        assert 1 < len(rows) < len(examples) and max(map(len, rows)) > 1
    else:
        assert len(rows) == 1, "every prompt starts with the same long system message: one row, one tree"
        assert shared["sequence_ids"].max() == 0
        # Under half the tokens of each pair alone (every prompt differs here, so a group is one pair), under a
        # quarter of standard DPO's.
        pairwise = sum(tree_tokens(sequences_of(examples, [index])) for index in range(len(examples)))
        standard = sum(map(len, sequences_of(examples, rows[0])))
        assert step.metrics["tokens/standard_dpo"] == standard
        assert tree < pairwise / 2 and tree < standard / 4
    assert_reads_their_prefixes(examples, shared, "next_token")
    assert_same_step(step, trl_dpo_step(attn_implementation))


def test_trees_flex_attention_forward(fresh_compiler):
    trl_trainer, ours = make_trainers(dpo_rows())
    assert_flex_forward_matches(trl_trainer, ours)


@pytest.mark.parametrize("mutation", ["trie_merges_different_tokens", "trie_merges_across_depths"])
def test_comparison_fails_on_a_wrong_merge(mutation, monkeypatch):
    ours = tree_layout_trainer("sdpa", packed=False)
    getattr(mutations, mutation)(monkeypatch)
    step, expected = train_step(ours), trl_dpo_step("sdpa")
    both = torch.cat([step.chosen_logps, step.rejected_logps])
    assert relative_error(both, torch.cat([expected.chosen_logps, expected.rejected_logps])) > 1e-3
    with pytest.raises(AssertionError):
        assert_same_step(step, expected)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_reward_trees_match_trl(packed):
    length = None
    if packed:
        _, probe = make_reward_trainers(reward_rows())
        length = packing_length(collators.split_common_prefixes(list(probe.train_dataset)))
    step = compare_rewards(reward_rows(), packing_length=length)
    rows = len(step.batch["shared_inputs"]["input_ids"])
    assert rows == 1 if not packed else 1 < rows < len(conversations())


def test_reward_tree_flex_attention_forward(fresh_compiler):
    trl_trainer, ours = make_reward_trainers(reward_rows())
    ours.model.set_attn_implementation("flex_attention")
    examples = list(ours.train_dataset)
    with torch.no_grad():
        rewards = ours.model(**ours.data_collator(examples), use_cache=False).logits
        expected = trl_trainer.model(**trl_trainer.data_collator(examples), use_cache=False).logits
    assert relative_error(rewards, expected) <= 1e-5


def test_hand_drawn_reward_tree():
    """The drawn tree as four tokenized reward sequences, in one packed row: 11 tokens computed where TRL's reward
    model runs 21, and TRL's rewards, loss and gradients."""
    dataset = Dataset.from_list([{"chosen_ids": sequence[0], "rejected_ids": sequence[1]} for sequence in DRAWN_PAIRS])
    step = compare_rewards(dataset, packing_length=16)
    assert len(step.batch["shared_inputs"]["input_ids"]) == 1
    assert step.metrics["tokens/computed"] == 11 and step.metrics["tokens/standard"] == 21
