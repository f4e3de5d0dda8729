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
