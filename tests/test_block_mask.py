"""The closed-form BlockMask builder (``collators.block_mask``) against ``create_block_mask`` on random layouts.

``create_block_mask`` evaluates the mask_mod at every query-key pair and sums each 128 x 128 block: it is the
definition, and the builder must give the same BlockMask (dense form, and the same full, partial and empty blocks)
without ever evaluating the whole mask.
"""

import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import collators
from collators import BLOCK, block_mask, build_shared_inputs


def random_examples(rng: random.Random, count: int, shared_prompts: bool) -> list[dict[str, list[int]]]:
    """Pairs of random lengths (1 to 300 tokens a part); with ``shared_prompts`` several pairs hold one prompt and
    some hold one response, so the layout has groups."""
    prompts = [[rng.randrange(100) for _ in range(rng.randint(1, 300))] for _ in range(max(1, count // 3))]
    responses = [[rng.randrange(100) for _ in range(rng.randint(1, 200))] for _ in range(count + 1)]
    examples = []
    for index in range(count):
        prompt = rng.choice(prompts) if shared_prompts else [rng.randrange(100) for _ in range(rng.randint(1, 300))]
        chosen, rejected = rng.sample(responses, 2) if shared_prompts else (responses[index], rng.choice(responses))
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return examples


def random_layout(seed: int, kind: str) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    examples = random_examples(rng, rng.randint(1, 6), shared_prompts=kind == "groups")
    if kind == "packed":
        rows, share_prompt = [list(range(len(examples)))], rng.random() < 0.7
        natural = build_shared_inputs(examples, rows, 0, share_prompt=share_prompt)["input_ids"].shape[1]
        # Odd lengths, and padding at the end of the row.
        return build_shared_inputs(examples, rows, 0, length=natural + rng.randint(0, 300), share_prompt=share_prompt)
    rows = collators.prompt_rows(examples) if kind == "groups" else [[index] for index in range(len(examples))]
    multiple = rng.choice([None, 128])
    return build_shared_inputs(examples, rows, 0, pad_to_multiple_of=multiple, num_rows=len(rows) + rng.randint(0, 1))


def with_bidirectional_blocks(shared: dict[str, torch.Tensor], rng: random.Random) -> dict[str, torch.Tensor]:
    """Marks runs of up to 300 tokens inside single tree nodes (constant subtree end, consecutive positions) as blocks
    their tokens see both ways, as a vision collator marks the images of Gemma 3."""
    visible_from = shared["visible_from"].clone()
    ends, positions = shared["subtree_end"], shared["position_ids"]
    for row in range(len(visible_from)):
        at = rng.randrange(8)
        while at < visible_from.shape[1]:
            stop = at + 1
            while (
                stop < min(visible_from.shape[1], at + rng.randint(2, 300))
                and ends[row, stop] == ends[row, at]
                and positions[row, stop] == positions[row, stop - 1] + 1
            ):
                stop += 1
            visible_from[row, at:stop] = at
            at = stop + rng.randrange(200)
    return {**shared, "visible_from": visible_from}


def assert_same_block_mask(ours, expected) -> None:
    assert ours.seq_lengths == expected.seq_lengths
    assert torch.equal(ours.to_dense(), expected.to_dense())
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(expected, name)), name


def reference(shared: dict[str, torch.Tensor], window: int | None):
    """``create_block_mask`` over the same mask_mod: the definition of the blocks."""
    rows, length = shared["input_ids"].shape
    return create_block_mask(block_mask(shared, window).mask_mod, rows, None, length, length, device="cpu")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", ["pairs", "groups", "packed"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_create_block_mask(kind, seed, bidirectional):
    shared = random_layout(seed, kind)
    rng = random.Random(seed)
    if bidirectional:
        shared = with_bidirectional_blocks(shared, rng)
        assert (shared["visible_from"] < torch.arange(shared["visible_from"].shape[1])).any()
    for window in (None, 1, rng.randint(2, 64), rng.randint(100, 400)):
        assert_same_block_mask(block_mask(shared, window), reference(shared, window))


def test_hand_drawn_pair_skips_the_blocks_between_responses():
    """One pair of 128-token parts: prompt, chosen, rejected are one block each. The rejected block sees the prompt
    block in full, itself causally, and skips the chosen block."""
    example = {"prompt_ids": [1] * BLOCK, "chosen_ids": [2] * BLOCK, "rejected_ids": [3] * BLOCK}
    mask = block_mask(build_shared_inputs([example], [[0]], 0))
    dense = mask.to_dense()[0, 0].tolist()  # 1: partial or full
    full = mask.full_kv_num_blocks[0, 0].tolist()
    assert dense == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert full == [0, 1, 1]  # chosen and rejected see the whole prompt block


def test_a_wrong_block_is_caught(monkeypatch):
    """The comparison fails when the builder gets a block wrong: here every key block before the query block is
    called full, as if prompt and chosen were both entirely visible to the rejected tokens."""
    shared = random_layout(0, "pairs")
    expected = reference(shared, None)
    real = collators._per_block
    monkeypatch.setattr(
        collators,
        "_per_block",
        lambda values, fill, reduce: (
            real(values, fill, reduce) if reduce == "max" else real(values, fill, reduce).clamp(min=10**9)
        ),
    )
    with pytest.raises(AssertionError):
        assert_same_block_mask(block_mask(shared, None), expected)


def test_a_missed_bidirectional_block_is_caught(monkeypatch):
    """The comparison fails when the builder decides the blocks of bidirectional runs in closed form, as if every
    token were causal: a key seen by an earlier query of its run lies in a block called empty."""
    shared = with_bidirectional_blocks(random_layout(1, "packed"), random.Random(1))
    expected = reference(shared, None)
    monkeypatch.setattr(collators, "_bidirectional_blocks", lambda visible_from: torch.zeros((), dtype=torch.bool))
    with pytest.raises(AssertionError):
        assert_same_block_mask(block_mask(shared, None), expected)
