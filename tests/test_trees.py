"""Prefix trees across the examples of a row: every shared prefix runs once, and training is still TRL's exactly.

The layout (``collators._lay_out_row``) is checked from the mask alone: each token's state depends on exactly the
tokens of one standard sequence's prefix, every standard read is taken at its own prefix, and, with prefix sharing,
no prefix of a row runs twice (hand-drawn, then random trees with a tiny vocabulary, so that sequences share starts,
a response is a prefix of the other or equal to it, and prompts extend earlier sequences).

Against trl.DPOTrainer and trl.RewardTrainer, float32 on CPU (loss, per-sequence log-probs or rewards, every
gradient, TRL's metrics): conversations whose prompts all start with one long system message and then differ, with a
pair whose responses share their first tokens, a pair whose chosen is a prefix of its rejected, and the three turns
of one conversation as one example each; unpacked (one tree for the whole batch) and packed, sdpa and eager, and the
flex_attention forward; with precomputed reference log-probs, and with LoRA adapters. Prompts that all start with the
same tool definitions (TRL's ``tools`` column, rendered by the chat template) run that block once per row; Step-DPO
prompts, each the problem and the steps so far (the one before extended by its chosen step), run every prompt once,
as the path of the longest one. Mutation tests show that the comparison fails when the trie merges two different
tokens, or nodes at different depths.
"""

import functools
import itertools
import json
import random
from typing import Any

import mutations
import pytest
import torch
from datasets import Dataset
from dpo_harness import (
    StepResult,
    assert_each_close,
    assert_flex_forward_matches,
    assert_same_step,
    lora_config,
    make_trainers,
    relative_error,
    train_step,
    tree_tokens,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_peft import compare_lora_steps
from test_properties import scoring_model
from test_reward import compare as compare_rewards
from test_reward import make_reward_trainers
from test_tool_calls import call, returned, tool, tool_calls, tool_tokenizer

import collators
from collators import (
    MIN_SHARED_PREFIX,
    PADDING_SEQUENCE,
    RESPONSES,
    PrefixSharingCollator,
    build_shared_inputs,
    common_prefix_length,
    dense_mask,
    prompt_rows,
    shared_sequence_length,
)
from packing import row_tokens
from prefix_dpo_trainer import PrefixDPOTrainer

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


# Two tools, about 360 tokens as the chat template renders them: every prompt starts with them.
TOOLS = [
    tool("weather", "Current weather of a city.", city="string"),
    tool("convert", "Converts a length to kilometres.", value="number", unit="string"),
]


def tool_rows() -> Dataset:
    """(prompt, chosen, rejected), each with the same ``tools``: a call and its result, or a direct answer, against
    a wrong call or a made-up answer; two responses calling the same tool share their first tokens, and the last
    prompt extends the first one by its chosen exchange and asks again (its chosen answer also answers another
    prompt). Stored as ``Json`` messages, as TRL's tool-call data loads from the hub."""
    lyon = [user("How warm is it in Lyon right now?")]
    lyon_answer = [call("weather", city="Lyon"), returned("weather", "18 C, light rain"), assistant("18 C and rainy.")]
    miles = [user("Convert 12 miles to kilometres.")]
    rows = [
        (lyon, lyon_answer, [assistant("It is always sunny in Lyon.")]),
        (
            miles,
            [call("convert", value=12, unit="mile"), returned("convert", "19.312"), assistant("About 19 km.")],
            [call("convert", value=12, unit="km"), returned("convert", "7.456"), assistant("About 7 km.")],
        ),
        ([user("Is it raining in Oslo?")], [call("weather", city="Oslo")], [call("weather", city="Lyon")]),
        ([user("Say hello.")], [assistant("Hello.")], [call("weather", city="Hello")]),
        ([*lyon, *lyon_answer, user("And in Oslo?")], [call("weather", city="Oslo")], [assistant("Also 18 C.")]),
    ]
    return tool_calls("json", [{"prompt": p, "chosen": c, "rejected": r, "tools": TOOLS} for p, c, r in rows])


PROBLEM = (
    "A library lends 240 books in its first week. Each week after that it lends 15 more books than the week before, "
    "and every fifth book lent is returned late. How many books are returned late over the first four weeks? "
)
# (correct step, wrong step): each wrong step starts like the correct one.
STEPS = [
    ("Step 1: The weeks lend 240, 255, 270 and 285 books.", "Step 1: The weeks lend 240, 265, 290 and 315 books."),
    (" Step 2: That is 240 + 255 + 270 + 285 = 1050 books.", " Step 2: That is 4 x 240 = 960 books."),
    (" Step 3: One in five is late, so 1050 / 5 = 210.", " Step 3: One in five is late, so 1050 - 5 = 1045."),
    (" Step 4: The answer is 210.", " Step 4: The answer is 1050."),
]


def step_rows() -> Dataset:
    """Step-DPO (plain text): the problem and the correct steps so far, then the next correct step against a wrong
    one; each prompt is the one before extended by its chosen step."""
    rows, prompt = [], PROBLEM
    for chosen, rejected in STEPS:
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        prompt += chosen
    return Dataset.from_list(rows)


def dpo_data(name: str) -> tuple[Dataset, dict[str, Any]]:
    """A data set of the comparisons with TRL, and the trainers' arguments that read it."""
    if name == "tools":
        return tool_rows(), {"tokenizer": tool_tokenizer()}
    return {"system": dpo_rows, "steps": step_rows}[name](), {}


def packing_length(examples: list[dict]) -> int:
    """Room for the tree of two examples a row, so that a batch spans several rows, each holding a tree of several
    examples (packing counts tree tokens)."""
    sizes = collators.layout_sizes(examples)
    return max(row_tokens(sizes[i : i + 2]) for i in range(len(sizes) - 1))


@functools.cache
def trl_dpo_step(data: str, attn_implementation: str = "sdpa") -> StepResult:
    """TRL's side of the comparisons, whatever our side's layout."""
    dataset, kwargs = dpo_data(data)
    trl_trainer, _ = make_trainers(dataset, attn_implementation=attn_implementation, **kwargs)
    return train_step(trl_trainer)


def tree_layout_trainer(data: str, packed: bool, attn_implementation: str = "sdpa") -> PrefixDPOTrainer:
    dataset, kwargs = dpo_data(data)
    length = None
    if packed:
        _, probe = make_trainers(dataset, **kwargs)
        length = packing_length(list(probe.train_dataset))
    _, ours = make_trainers(dataset, attn_implementation=attn_implementation, packing_length=length, **kwargs)
    return ours


def pairwise_tokens(examples: list[dict], indices) -> int:
    """What pairwise prefix sharing runs for these examples: each pair's own tree."""
    return sum(tree_tokens(sequences_of(examples, [index])) for index in indices)


def tree_rows(ours: PrefixDPOTrainer, step: StepResult, packed: bool) -> tuple[list[dict], list[list[int]]]:
    """The examples and the rows of the step's batch (one row unpacked; packed, several, one of several examples),
    after checking that it computed exactly their trees' tokens and read every completion token at its own prefix."""
    examples = list(ours.train_dataset)
    rows = ours.data_collator.layout_rows(examples)
    assert step.metrics["tokens/computed"] == sum(tree_tokens(sequences_of(examples, row)) for row in rows)
    if packed:
        assert 1 < len(rows) < len(examples) and max(map(len, rows)) > 1
    else:
        assert len(rows) == 1, "every prompt starts with the same long prefix: one row, one tree"
        assert step.batch["shared_inputs"]["sequence_ids"].max() == 0
    assert_reads_their_prefixes(examples, step.batch["shared_inputs"], "next_token")
    return examples, rows


@pytest.mark.parametrize(
    ("attn_implementation", "packed"),
    [("sdpa", False), ("sdpa", True), ("eager", False)],
    ids=["sdpa-unpacked", "sdpa-packed", "eager-unpacked"],
)
def test_trees_match_trl(attn_implementation, packed):
    ours = tree_layout_trainer("system", packed, attn_implementation)
    step = train_step(ours)
    examples, rows = tree_rows(ours, step, packed)
    if not packed:
        # Under half the tokens of each pair alone (every prompt differs here, so a group is one pair), under a
        # quarter of standard DPO's.
        tree = step.metrics["tokens/computed"]
        standard = sum(map(len, sequences_of(examples, rows[0])))
        assert step.metrics["tokens/standard_dpo"] == standard
        assert tree < pairwise_tokens(examples, range(len(examples))) / 2 and tree < standard / 4
    assert_same_step(step, trl_dpo_step("system", attn_implementation))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_tool_definitions_run_once_per_row(packed):
    """Every prompt starts with the tool block: a row of n examples computes at least n - 1 times its length fewer
    tokens than pairwise prefix sharing, and every prefix once (read from the mask)."""
    ours = tree_layout_trainer("tools", packed)
    step = train_step(ours)
    examples, rows = tree_rows(ours, step, packed)
    block = min(common_prefix_length(examples[0]["prompt_ids"], example["prompt_ids"]) for example in examples)
    rendered = ours.processing_class.decode(examples[0]["prompt_ids"][:block])
    assert block >= MIN_SHARED_PREFIX and "Tools: " in rendered
    assert all(json.dumps(definition["function"]["name"]) in rendered for definition in TOOLS)
    saved = sum((len(row) - 1) * block for row in rows)
    assert step.metrics["tokens/computed"] <= pairwise_tokens(examples, range(len(examples))) - saved
    assert_every_prefix_runs_once(examples, rows, step.batch["shared_inputs"])
    assert_same_step(step, trl_dpo_step("tools"))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_nested_step_prompts_match_trl(packed):
    """Step-DPO: a row computes its longest prompt, which holds the others, and the responses; no prompt twice."""
    ours = tree_layout_trainer("steps", packed)
    step = train_step(ours)
    examples, rows = tree_rows(ours, step, packed)
    for earlier, later in itertools.pairwise(examples):  # the tokens extend too (the chosen step without its EOS)
        extended = earlier["prompt_ids"] + earlier["chosen_ids"][:-1]
        assert later["prompt_ids"][: len(extended)] == extended
    responses = sum(len(examples[index][column]) for index in range(len(examples)) for column in RESPONSES)
    longest_prompts = sum(len(examples[row[-1]]["prompt_ids"]) for row in rows)  # rows hold consecutive examples
    assert step.metrics["tokens/computed"] <= longest_prompts + responses
    assert_every_prefix_runs_once(examples, rows, step.batch["shared_inputs"])
    assert_same_step(step, trl_dpo_step("steps"))


def test_trees_with_precomputed_reference_log_probs(monkeypatch, tmp_path):
    """TRL precomputes the reference log-probs in its ``__init__``: ours do so on the same tree, and agree."""
    layouts = []
    build = collators.build_shared_inputs

    def recording(examples, rows, *args, **kwargs):
        layouts.append(rows)
        return build(examples, rows, *args, **kwargs)

    monkeypatch.setattr(collators, "build_shared_inputs", recording)
    trl_trainer, ours = make_trainers(dpo_rows(), reference="precompute", tmp_path=tmp_path)
    assert layouts == [[list(range(len(conversations())))]], "one batch, one tree"
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert_each_close(torch.tensor(ours.train_dataset[column]), torch.tensor(trl_trainer.train_dataset[column]))
    step, expected = train_step(ours), train_step(trl_trainer)
    tree_rows(ours, step, packed=False)
    assert "ref_chosen_logps" in step.batch
    assert_same_step(step, expected)
    # The reference is not the policy, so the rewards depend on the precomputed log-probs.
    assert abs(expected.metrics["rewards/chosen"]) > 1e-2 and abs(expected.metrics["rewards/rejected"]) > 1e-2


def test_trees_with_lora():
    trl_trainer, ours = make_trainers(dpo_rows(), peft_config=lora_config())
    tree_rows(ours, compare_lora_steps(trl_trainer, ours), packed=False)


def test_trees_flex_attention_forward(fresh_compiler):
    trl_trainer, ours = make_trainers(dpo_rows())
    assert_flex_forward_matches(trl_trainer, ours)


@pytest.mark.parametrize("mutation", ["trie_merges_different_tokens", "trie_merges_across_depths"])
def test_comparison_fails_on_a_wrong_merge(mutation, monkeypatch):
    ours = tree_layout_trainer("system", packed=False)
    getattr(mutations, mutation)(monkeypatch)
    step, expected = train_step(ours), trl_dpo_step("system")
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


# --- unpacked rows of several prompts: gathered by --group_by_prefix, capped by max_length -------------------------

OTHER_SYSTEM = (
    "You answer questions about the county's bus lines and their tickets. Give the line number and one stop, keep "
    "to a single short sentence, be polite, and say so plainly when a timetable or a fare is not known to you."
)
QUESTIONS = [
    ("Which line goes to the hospital?", "Line 4 stops at the main gate of the hospital.", "Take any line."),
    ("Is there a night bus?", "Yes, line N1 runs hourly until two in the morning.", "No, never."),
    ("Can I bring a bicycle?", "Only folded bicycles are allowed on board.", "Yes, any bicycle, any time."),
    ("Where do I buy a ticket?", "From the driver, or at the machine by the station.", "Tickets are free."),
]


def system_prompt_rows() -> Dataset:
    """Distinct questions behind two long system messages (each renders to more than ``MIN_SHARED_PREFIX`` tokens,
    and they differ from their first words)."""
    rows = [
        {
            "prompt": [{"role": "system", "content": system}, user(q)],
            "chosen": [assistant(c)],
            "rejected": [assistant(r)],
        }
        for system in (SYSTEM, OTHER_SYSTEM)
        for q, c, r in QUESTIONS
    ]
    return Dataset.from_list(rows)


def test_group_by_prefix_gathers_a_system_prompts_questions_and_matches_trl(tmp_path):
    """Batches of 4 of the 8 pairs: by shared prefix, a batch holds one system prompt's 4 questions, one row and one
    tree, where shuffled batches mix the two system prompts and run each of them once per row; each grouped step is
    TRL's on the same pairs."""
    batch = {"per_device_train_batch_size": 4, "seed": 3}
    trl_trainer, grouped = make_trainers(system_prompt_rows(), tmp_path=tmp_path, group_by_prefix=True, **batch)
    _, shuffled = make_trainers(system_prompt_rows(), tmp_path=tmp_path, **batch)
    examples = list(grouped.train_dataset)
    keys = [collators.prompt_row_key(example["prompt_ids"]) for example in examples]
    assert len(set(keys)) == 2 and len({tuple(example["prompt_ids"]) for example in examples}) == len(examples)
    computed = 0
    for indices in grouped.get_train_dataloader().batch_sampler:
        assert len({keys[i] for i in indices}) == 1 and len(indices) == 4
        step = train_step(grouped, examples=[examples[i] for i in indices])
        assert len(step.batch["shared_inputs"]["input_ids"]) == 1
        computed += step.metrics["tokens/computed"]
        assert_same_step(step, train_step(trl_trainer, examples=[trl_trainer.train_dataset[i] for i in indices]))
    assert computed == sum(
        tree_tokens(sequences_of(examples, [i for i, key in enumerate(keys) if key == prefix])) for prefix in set(keys)
    )
    mixed = sum(int((batch["shared_inputs"]["sequence_ids"] >= 0).sum()) for batch in shuffled.get_train_dataloader())
    block = common_prefix_length(examples[0]["prompt_ids"], examples[1]["prompt_ids"])
    assert mixed >= computed + block, "shuffled, some batch runs a system prompt twice"


def test_reward_group_by_prefix_gathers_a_system_prompts_questions(tmp_path):
    """The reward trainer's prompt is a pair's common prefix: its batches gather by the same key."""
    dataset = Dataset.from_list(
        [
            {"chosen": [*r["prompt"], *r["chosen"]], "rejected": [*r["prompt"], *r["rejected"]]}
            for r in system_prompt_rows()
        ]
    )
    _, ours = make_reward_trainers(dataset, tmp_path=tmp_path, group_by_prefix=True, per_device_train_batch_size=4)
    batches = list(ours.get_train_dataloader())
    assert len(batches) == 2 and all(len(batch["shared_inputs"]["input_ids"]) == 1 for batch in batches)


def test_a_merged_row_holds_at_most_what_one_pair_may_take(tmp_path):
    """With ``max_length`` the longest example (nothing is cut), a row holds at most the tree tokens one pair may take,
    ``2 max_length - 1`` (a DPO prompt holds a token at least): each system prompt's questions take two rows, each
    a tree read at its own prefixes, and the step is TRL's."""
    _, probe = make_trainers(system_prompt_rows())
    examples = list(probe.train_dataset)
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    trl_trainer, ours = make_trainers(system_prompt_rows(), max_length=longest)
    cap = ours.data_collator.max_row_tokens
    assert cap == 2 * longest - 1 and list(ours.train_dataset) == examples
    rows = ours.data_collator.layout_rows(examples)
    unbounded = prompt_rows(examples)
    assert max(tree_tokens(sequences_of(examples, row)) for row in unbounded) > cap, "the merge would pass the cap"
    assert len(rows) > len(unbounded) and all(tree_tokens(sequences_of(examples, row)) <= cap for row in rows)
    # Greedy in order: a row of a key is full when its key's next example would not fit it.
    for row, following in itertools.pairwise(rows):
        if collators.prompt_row_key(examples[row[0]]["prompt_ids"]) == collators.prompt_row_key(
            examples[following[0]]["prompt_ids"]
        ):
            assert tree_tokens(sequences_of(examples, [*row, following[0]])) > cap
    step = train_step(ours)
    assert step.metrics["tokens/computed"] == sum(tree_tokens(sequences_of(examples, row)) for row in rows)
    assert_reads_their_prefixes(examples, step.batch["shared_inputs"], "next_token")
    assert_every_prefix_runs_once(examples, rows, step.batch["shared_inputs"])
    assert_same_step(step, train_step(trl_trainer))
