"""Preference-dataset preparation that must be identical with and without prefix sharing.

TRL tokenizes each example into ``prompt_ids``/``chosen_ids``/``rejected_ids``. Two things happen around that here:
the Capybara schema is normalized before it, and truncation to ``max_length`` happens after it, per example, so the
prompt is cut once and stays a prefix shared by both responses.
"""

from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset


def is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def normalize_schema(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Drops a plain-text ``prompt`` that sits beside whole conversations (the Capybara schema).

    Capybara's ``prompt`` is only the first user turn, while ``chosen``/``rejected`` hold the whole conversation,
    prompt turns included. TRL then finds the shared prefix itself: every turn the two conversations have in common.
    """
    first = next(iter(dataset))
    if isinstance(first.get("prompt"), str) and is_message_list(first.get("chosen")):
        dataset = dataset.remove_columns("prompt")
    return dataset


def truncate_example(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_length: int | None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[int], list[int]] | None:
    """Fits ``prompt + the longer response`` into ``max_length``, or returns ``None`` when nothing of it can train.

    When it does not fit, the prompt keeps its last ``max_prompt_length`` tokens (if set), then both responses keep
    their first ``max_length - len(prompt)`` tokens. Without ``max_prompt_length`` a prompt that alone fills
    ``max_length`` leaves no response token, so the example is dropped, as TRL drops it.

    >>> truncate_example([1, 2, 3, 4], [5, 6, 7], [8], max_length=5, max_prompt_length=3)
    ([2, 3, 4], [5, 6], [8])
    """
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_length is None or len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
    room = max_length - len(prompt)
    if room <= 0:
        return None
    return prompt, chosen[:room], rejected[:room]


def truncate_dataset(
    dataset: Dataset | IterableDataset, max_length: int | None, max_prompt_length: int | None, **map_kwargs: Any
) -> tuple[Dataset | IterableDataset, int | None]:
    """Applies :func:`truncate_example` to a tokenized dataset; returns it and how many examples were dropped."""
    if max_length is None:
        return dataset, 0

    def fits(example: dict[str, Any]) -> bool:
        return max_prompt_length is not None or len(example["prompt_ids"]) < max_length

    def truncate(example: dict[str, Any]) -> dict[str, Any]:
        fitted = truncate_example(
            example["prompt_ids"], example["chosen_ids"], example["rejected_ids"], max_length, max_prompt_length
        )
        return dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), fitted, strict=True))

    before = len(dataset) if isinstance(dataset, Dataset) else None
    dataset = dataset.filter(fits, **map_kwargs).map(truncate, **map_kwargs)
    dropped = before - len(dataset) if before is not None else None
    return dataset, dropped
