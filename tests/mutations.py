"""Wrong layouts and masks that the exactness comparisons must catch: each breaks one thing prefix sharing relies on.

Each is applied next to the comparison it must break (against trl.DPOTrainer, or FlexAttention's forward against
it), whose test asserts that the comparison raises and that the log-probs moved by more than its tolerance
(:func:`assert_caught`). A monkeypatch mutation takes pytest's ``monkeypatch``; a batch transform takes the collated
batch and returns it.
"""

from typing import Any, Literal

import pytest
import torch
from dpo_harness import RTOL, StepResult, assert_same_step, relative_error
from torch.nn.attention.flex_attention import BlockMask

import collators
import shared_layout

# What a caught mutation must move the log-probs by, at least: far enough above the comparison's tolerance that the
# comparison does not fail by rounding luck.
CAUGHT = 100 * RTOL


def responses_see_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token is seen by the rest of its document, as if the layout were one causal sequence: the rejected
    response sees the chosen one, and a group's responses see those laid out before them."""
    lay_out_row = collators._lay_out_row

    def mutated(*args, **kwargs):
        ids, positions, sequences, ends, spans = lay_out_row(*args, **kwargs)
        document_end = {document: index + 1 for index, document in enumerate(sequences)}
        return ids, positions, sequences, [document_end[document] for document in sequences], spans

    monkeypatch.setattr(collators, "_lay_out_row", mutated)


def documents_see_the_one_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed examples leak into each other: every subtree is seen by the one laid out after it as well. With prefix
    sharing a packed row is one tree (its sequences share at least BOS) whose examples are sibling subtrees, so the
    next example sees the one before it (and inside an example the rejected response the chosen one); without it,
    each sequence is a document, and the next document sees the one before it."""
    lay_out_row = collators._lay_out_row

    def mutated(*args, **kwargs):
        ids, positions, sequences, ends, spans = lay_out_row(*args, **kwargs)
        document_end = {document: index + 1 for index, document in enumerate(sequences)}
        in_order = list(document_end.values())
        next_document_end = dict(zip(in_order, in_order[1:], strict=False))
        # The subtree after a span that ends inside its document starts right at that end: its first node's end is
        # the sibling subtree's.
        leaked = [
            ends[end] if end < document_end[document] else next_document_end.get(end, end)
            for end, document in zip(ends, sequences, strict=True)
        ]
        return ids, positions, sequences, leaked, spans

    monkeypatch.setattr(collators, "_lay_out_row", mutated)


def positions_continue(batch: dict) -> dict:
    """Batch transform: positions run on through the row instead of restarting after the prompt (and per
    document)."""
    shared = batch["shared_inputs"]
    shared["position_ids"] = torch.arange(shared["position_ids"].shape[1]).expand_as(shared["position_ids"]).clone()
    return batch


def window_off_by(monkeypatch: pytest.MonkeyPatch, shift: int) -> None:
    """Sliding windows ``shift`` tokens wider (or narrower, when negative) than the model's, in every mask the rule
    builds: dense, additive and FlexAttention's (block selection and mask_mod)."""
    allowed = collators._allowed

    def mutated(visible_from, subtree_end, position, window, batch, query, key):
        shifted = None if window is None else window + shift
        return allowed(visible_from, subtree_end, position, shifted, batch, query, key)

    monkeypatch.setattr(collators, "_allowed", mutated)


def score_index_shifted(batch: dict) -> dict:
    """Batch transform: the head reads the state one token after the one predicting each label (still inside the
    response, since the state of a response's last token predicts nothing)."""
    shared = batch["shared_inputs"]
    shared["score_index"] = shared["score_index"] + 1
    return batch


EagerMistake = Literal["boolean", "inverted", "zero_fill"]


def eager_mask_wrong(monkeypatch: pytest.MonkeyPatch, mistake: EagerMistake) -> None:
    """The mask eager attention adds to its scores is wrong: the boolean mask (eager adds True as 1 and False as 0,
    so every key is seen), the additive fill inverted (the allowed keys masked, the others seen), or a fill of zero
    (nothing masked)."""
    attention_mask_for = shared_layout.attention_mask_for

    def wrong(additive: torch.Tensor) -> torch.Tensor:
        allowed = additive == 0
        if mistake == "boolean":
            return allowed
        if mistake == "inverted":
            return torch.zeros_like(additive).masked_fill(allowed, torch.finfo(additive.dtype).min)
        return torch.zeros_like(additive)

    def mutated(shared: dict[str, torch.Tensor], config, dtype: torch.dtype) -> Any:
        if config._attn_implementation != "eager":
            raise RuntimeError("an eager mask mutation must run under eager attention")
        masks = attention_mask_for(shared, config, dtype)
        return {kind: wrong(mask) for kind, mask in masks.items()} if isinstance(masks, dict) else wrong(masks)

    monkeypatch.setattr(shared_layout, "attention_mask_for", mutated)


def _selected(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A BlockMask's ``(counts, indices)`` as the boolean ``(rows, heads, q_blocks, kv_blocks)`` block selection."""
    taken = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    return torch.zeros(indices.shape, dtype=torch.bool, device=indices.device).scatter(-1, indices.long(), taken)


def partial_blocks_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention skips the mask_mod on blocks that need it: every partial block off the diagonal is marked full,
    so a block where a document (or a response) starts or ends mid-block is seen whole."""
    block_mask = collators.block_mask

    def mutated(shared: dict[str, torch.Tensor], window: int | None = None) -> BlockMask:
        mask = block_mask(shared, window)
        partial = _selected(mask.kv_num_blocks, mask.kv_indices)[:, 0]
        full = _selected(mask.full_kv_num_blocks, mask.full_kv_indices)[:, 0]
        diagonal = torch.eye(partial.shape[-1], dtype=torch.bool, device=partial.device)
        if not (partial & ~diagonal).any():
            raise RuntimeError("the layout must have partial blocks off the diagonal")
        return BlockMask.from_kv_blocks(
            *collators._ordered(partial & diagonal),
            *collators._ordered(full | partial & ~diagonal),
            BLOCK_SIZE=collators.BLOCK,
            mask_mod=mask.mask_mod,
            seq_lengths=mask.seq_lengths,
        )

    monkeypatch.setattr(collators, "block_mask", mutated)


def mask_mod_reaches_one_further(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's mask_mod (only) lets every key be seen one token past its subtree's end: the first rejected
    token sees the last chosen one, and a packed document's first token the end of the document before. The block
    selection stays right."""
    mask_mod = collators._mask_mod

    def mutated(visible_from: torch.Tensor, subtree_end: torch.Tensor, position: torch.Tensor, window: torch.Tensor):
        return mask_mod(visible_from, subtree_end + 1, position, window)

    monkeypatch.setattr(collators, "_mask_mod", mutated)


def log_probs_error(ours: StepResult, trl: StepResult) -> float:
    """Relative error of all the sequence log-probs, chosen and rejected."""
    return relative_error(
        torch.cat([ours.chosen_logps, ours.rejected_logps]), torch.cat([trl.chosen_logps, trl.rejected_logps])
    )


def assert_caught(ours: StepResult, trl: StepResult) -> float:
    """A mutated step against TRL's: the log-probs moved by more than :data:`CAUGHT`, and the comparison raises.
    Returns the log-probs' relative error."""
    error = log_probs_error(ours, trl)
    assert error > CAUGHT, f"the mutation moved the log-probs by {error:.2e} only"
    with pytest.raises(AssertionError):
        assert_same_step(ours, trl)
    return error


def trie_merges_different_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trie finds one token more in common than a run and a sequence share: where the sequence leaves the run,
    its first different token is merged into the run's, and the sequence's later tokens see a token it does not hold.
    (``split_common_prefixes``, which reward pairs go through, finds the same one token too many.)"""
    common_prefix_length = collators.common_prefix_length

    def mutated(first, second) -> int:
        return min(common_prefix_length(first, second) + 1, len(first), len(second))

    monkeypatch.setattr(collators, "common_prefix_length", mutated)


def trie_merges_across_depths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Responses merged by their tokens alone, as a trie keyed by tokens but not by parent and depth would: a
    response that an earlier example of the row holds under another prompt (at another depth) is read from that
    example's states."""
    lay_out_row = collators._lay_out_row

    def mutated(examples, *args, **kwargs):
        ids, positions, sequences, ends, placements = lay_out_row(examples, *args, **kwargs)
        first_holder: dict[tuple[int, ...], list[int]] = {}
        for (index, column), at in placements.items():
            prompt = len(examples[index]["prompt_ids"])
            at[prompt:] = first_holder.setdefault(tuple(examples[index][column]), at[prompt:])
        return ids, positions, sequences, ends, placements

    monkeypatch.setattr(collators, "_lay_out_row", mutated)
