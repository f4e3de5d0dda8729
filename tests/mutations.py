"""Wrong layouts that the exactness comparisons must catch: each breaks one thing prefix sharing relies on."""

import pytest
import torch

import collators


def responses_see_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token is seen by the rest of its document, as if the layout were one causal sequence: the rejected
    response sees the chosen one, and a group's responses see those laid out before them."""
    lay_out_row = collators._lay_out_row

    def mutated(*args, **kwargs):
        ids, positions, sequences, ends, spans = lay_out_row(*args, **kwargs)
        document_end = {document: index + 1 for index, document in enumerate(sequences)}
        return ids, positions, sequences, [document_end[document] for document in sequences], spans

    monkeypatch.setattr(collators, "_lay_out_row", mutated)


def positions_continue(batch: dict) -> dict:
    """Batch transform: positions run on through the row instead of restarting after the prompt (and per
    document)."""
    shared = batch["shared_inputs"]
    shared["position_ids"] = torch.arange(shared["position_ids"].shape[1]).expand_as(shared["position_ids"]).clone()
    return batch


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
