"""Packing of DPO examples into rows of at most ``capacity`` tokens, and a batch sampler that yields packed rows.

Each example has a known token length (computed elsewhere), or is given as its *parts*: ``(key, tokens)`` pairs, such
as the runs of tokens its sequences hold, where parts with the same key are laid out once per row (sequences of a row
that start alike share their common prefix, see ``collators.layout_sizes``). :func:`pack_rows` bin-packs examples into
rows, :class:`PackedBatchSampler` turns an epoch's packing into batches of ``rows_per_batch`` rows, and the collator
splits a batch back into rows with :func:`next_fit`. :func:`prompt_units` keeps the pairs of one prompt together,
and unpacked also the prompts that share a long prefix (``--group_by_prefix``).

The sampler is not rank-aware: accelerate's ``BatchSamplerShard`` deals
batch ``i`` to process ``i % num_processes``, so the sampler only has to yield a multiple of ``num_processes`` batches
for every rank to take the same number of steps without any example being repeated or dropped. A streamed dataset
gives no lengths up front: :class:`PackedStream` packs it window by window, a :class:`PackedBatchSampler` per window.

Next-fit reproduces the sampler's rows by construction: the sampler runs :func:`next_fit` over every batch in the
order it yields it and reports those rows (:meth:`PackedBatchSampler.batch_rows`). Over rows that each fit, next-fit
never makes more rows than were planned (its ``k``-th row always ends at or after the ``k``-th planned one) and never
overfills one; it departs from the plan only where the first example of a row fits in the free space of the row
before. Shuffled batches put the fullest rows first and each row's longest example first, and then next-fit gives back
exactly the planned rows (no departure seen on lognormal lengths up to 100k examples); unshuffled batches keep dataset
order, where next-fit now and then moves an example across a row boundary without changing the number of rows.
With parts, an example costs a row only the parts the row does not hold yet, in the plan (best fit) as in next-fit. A
row's cost can only shrink when examples leave it, so the argument above still holds: next-fit never makes more rows
than were planned. With prefix sharing an example's parts are the edges of the prefix tree its sequences take
(``collators.layout_sizes``), so that a row's cost is the tokens of its tree.
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any, TypeAlias

import torch
from torch.utils.data import IterableDataset, Sampler

__all__ = [
    "PackedBatchSampler",
    "PackedStream",
    "auto_packing_length",
    "next_fit",
    "pack_rows",
    "packing_statistics",
    "prompt_units",
    "row_tokens",
]

Part: TypeAlias = tuple[Hashable, int]
# An example's size: its length in tokens, or its parts (a part laid out once per row, however many examples hold it).
Size: TypeAlias = int | Sequence[Part]


class _Own:
    """The key of an example given as a plain length: a part no other example has."""

    __slots__ = ("position",)

    def __init__(self, position: int) -> None:
        self.position = position


def _parts(size: Size, position: int) -> dict[Hashable, int]:
    if isinstance(size, int):
        return {_Own(position): size}
    return dict(size)


def row_tokens(sizes: Sequence[Size]) -> int:
    """Tokens a row of these examples takes: every distinct part once.

    >>> row_tokens([[("prompt", 5), ("a", 2), ("b", 3)], [("prompt", 5), ("a", 2), ("c", 1)], 4])
    15
    """
    held: dict[Hashable, int] = {}
    for position, size in enumerate(sizes):
        held.update(_parts(size, position))
    return sum(held.values())


def _checked_lengths(lengths: Sequence[int], capacity: int) -> list[int]:
    if capacity < 1:
        raise ValueError(f"capacity must be a positive number of tokens, got {capacity}")
    values = [int(length) for length in lengths]
    if not values:
        return values
    if min(values) < 1:
        index = next(i for i, length in enumerate(values) if length < 1)
        raise ValueError(f"example {index} has length {values[index]}; every example must have at least one token")
    longest = max(values)
    if longest > capacity:
        index = next(i for i, length in enumerate(values) if length > capacity)
        over = sum(length > capacity for length in values)
        raise ValueError(
            f"example {index} has {values[index]} tokens, more than the packing capacity {capacity} "
            f"({over} example(s) do not fit); the smallest capacity that fits every example is {longest}"
        )
    return values


# Where an example holds parts that other examples hold too, best fit also tries the last rows that took each such
# part: the row a prefix tree grows in (a conversation's turns, a group's pairs) is among them, and a part that every
# row holds (a system prompt) costs a bounded number of tries per example.
_RECENT_HOLDERS = 8


def _best_fit(
    order: Sequence[int],
    lengths: Sequence[int],
    capacity: int,
    rows: list[list[int]] | None = None,
    parts: Sequence[dict[Hashable, int]] | None = None,
) -> list[list[int]]:
    """Best-fit of ``order`` (already in placement order, normally by decreasing length) into ``rows`` plus new rows.

    The free space of the open rows is kept in one sorted list of ``free * stride + row`` integers, so finding the
    tightest row that takes an example is a bisect; ties in free space go to the oldest row, as in first-fit. A row
    whose free space is below the shortest example still to be placed leaves the list, which keeps it short. Returns
    ``rows`` extended in place (the new rows appended in the order they were opened).

    With ``parts`` (each example's parts by key, as :func:`row_tokens` counts them) an example costs a row only the
    parts the row does not hold yet: besides the tightest row that takes it whole, it may go to one of the last
    ``_RECENT_HOLDERS`` rows to take each part it shares with another example, wherever it leaves the least free space.
    """
    rows = [] if rows is None else rows
    if not order:
        return rows
    stride = len(rows) + len(order) + 1
    shortest = min(lengths[i] for i in order)
    held: list[dict[Hashable, int]] = []
    holders: dict[Hashable, list[int]] = {}
    shared: set[Hashable] = set()

    def took(row: int, keys: Iterable[Hashable]) -> None:
        for key in shared.intersection(keys):
            recent = holders.setdefault(key, [])
            if row in recent:
                recent.remove(row)
            recent.append(row)
            del recent[:-_RECENT_HOLDERS]

    if parts is None:
        frees = [capacity - sum(lengths[i] for i in row) for row in rows]
    else:
        counts = Counter(key for i in itertools.chain(order, *rows) for key in parts[i])
        shared.update(key for key, count in counts.items() if count > 1)
        for r, row in enumerate(rows):
            held.append({key: tokens for i in row for key, tokens in parts[i].items()})
            took(r, held[r])
        frees = [capacity - sum(union.values()) for union in held]
    free_keys = sorted(free * stride + r for r, free in enumerate(frees) if free >= shortest)

    def added(index: int, row: int) -> int:
        return sum(tokens for key, tokens in parts[index].items() if key not in held[row])

    for index in order:
        size = lengths[index]
        at = bisect_left(free_keys, size * stride)
        row = free_keys[at] % stride if at < len(free_keys) else None
        cost = size
        if parts is not None:
            if row is not None:
                cost = added(index, row)
            for candidate in {r for key in parts[index] for r in holders.get(key, ())}:
                extra = added(index, candidate)
                fits = extra <= frees[candidate]
                if fits and (row is None or (frees[candidate] - extra, candidate) < (frees[row] - cost, row)):
                    row, cost = candidate, extra
        if row is None:
            row = len(rows)
            rows.append([index])
            frees.append(capacity - size)
            if parts is not None:
                held.append(dict(parts[index]))
        else:
            if frees[row] >= shortest:
                free_keys.pop(bisect_left(free_keys, frees[row] * stride + row))
            rows[row].append(index)
            frees[row] -= cost
            if parts is not None:
                held[row].update(parts[index])
        if parts is not None:
            took(row, parts[index])
        if frees[row] >= shortest:
            insort(free_keys, frees[row] * stride + row)
    return rows


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _by_decreasing_length(indices: Sequence[int], lengths: Sequence[int]) -> list[int]:
    # Python's sort is stable also with reverse=True, so equal lengths keep the order they came in: a shuffled input
    # gives random tie-breaking, a dataset-ordered input a deterministic one.
    return sorted(indices, key=lengths.__getitem__, reverse=True)


def _in_tree_order(indices: Sequence[int], parts: Sequence[dict[Hashable, int]]) -> list[int]:
    """``indices`` sorted by their parts in order, each part ranked by first appearance: examples that start with the
    same parts come together, and those that share more come closer still (a depth-first walk of a prefix tree)."""
    rank: dict[Hashable, int] = {}
    for index in indices:
        for key in parts[index]:
            rank.setdefault(key, len(rank))
    return sorted(indices, key=lambda index: [rank[key] for key in parts[index]])


def _planned_rows(
    indices: Sequence[int],
    lengths: Sequence[int],
    capacity: int,
    parts: Sequence[dict[Hashable, int]] | None = None,
    rows: Sequence[list[int]] = (),
) -> list[list[int]]:
    """Best fit of ``indices`` longest first into copies of ``rows`` plus new rows; with parts, also in tree order
    (:func:`_in_tree_order`), keeping whichever takes fewer rows (longest first on a tie).

    Longest first is what bin packing wants, but it places the longest turn of every conversation before any shorter
    one, and the rows fill before the turns that share most with them come; in tree order they come one after the
    other and join the row that holds what they share (multi-turn conversations: a third fewer rows).
    """
    longest_first = _by_decreasing_length(indices, lengths)
    planned = _best_fit(longest_first, lengths, capacity, [list(row) for row in rows], parts)
    if parts is None:
        return planned
    tree = _best_fit(_in_tree_order(indices, parts), lengths, capacity, [list(row) for row in rows], parts)
    return tree if len(tree) < len(planned) else planned


def _shared_parts(sizes: Sequence[Size]) -> list[dict[Hashable, int]] | None:
    """Each example's parts by key, for best fit to count what a row already holds; ``None`` for plain lengths."""
    if all(isinstance(size, int) for size in sizes):
        return None
    return [_parts(size, position) for position, size in enumerate(sizes)]


def pack_rows(lengths: Sequence[Size], capacity: int) -> list[list[int]]:
    """Pack example indices into rows of at most ``capacity`` tokens with best-fit decreasing.

    Best-fit decreasing has first-fit-decreasing's guarantee (at most ``11/9 * optimal + 6/9`` rows) and in practice
    packs at least as tightly. It runs in ``O(n log n)`` plus list moves in C (100k examples: about 0.1 s). Every
    index appears exactly once; rows are in the order they were opened, each row's examples longest first. Examples
    given as parts cost a row only the parts it does not hold yet, and are also placed in prefix-tree order, the
    packing with fewer rows kept (see :func:`_planned_rows`).

    >>> pack_rows([5, 3, 4, 2, 6], capacity=10)
    [[4, 2], [0, 1, 3]]
    >>> pack_rows([[("p", 6), ("a", 2)], [("p", 6), ("b", 2)], 3], capacity=10)
    [[0, 1], [2]]

    Raises ``ValueError`` for an example longer than ``capacity`` (naming it and the smallest capacity that fits all).
    """
    parts = _shared_parts(lengths)
    values = _checked_lengths(lengths if parts is None else [sum(held.values()) for held in parts], capacity)
    return _planned_rows(range(len(values)), values, capacity, parts)


def next_fit(
    lengths: Sequence[Size],
    capacity: int,
    prompts: Sequence[Hashable] | None = None,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Split positions ``0..n-1`` of ``lengths`` into consecutive rows, a new one when the next example does not fit.

    This is what the collator does with a batch; order is kept. An example given as parts takes only the parts its row
    does not hold yet (the second pair of a prompt costs its responses, not the prompt again).

    ``prompts`` (a key per example) keeps runs of consecutive examples of one prompt in one row: a run that does not
    fit the open row starts a new one when it fits a row, and fills rows in order otherwise. Should that take more
    than ``max_rows`` rows, the plain rule is used instead, which never takes more rows than a plan that cut the same
    order into rows that fit (its ``k``-th row ends at or after the plan's ``k``-th).

    >>> next_fit([4, 5, 2, 7, 3], capacity=10)
    [[0, 1], [2, 3], [4]]
    >>> pair = [("p", 4), ("a", 2), ("b", 2)]
    >>> next_fit([[("q", 1)], pair, [("p", 4), ("a", 2), ("c", 2)]], 10)
    [[0, 1], [2]]
    >>> next_fit([[("q", 1)], pair, [("p", 4), ("a", 2), ("c", 2)]], 10, prompts=["q", "p", "p"])
    [[0], [1, 2]]
    """
    parts = [_parts(size, position) for position, size in enumerate(lengths)]
    _checked_lengths([sum(example.values()) for example in parts], capacity)
    if prompts is not None:
        runs = [list(run) for _, run in itertools.groupby(range(len(parts)), key=prompts.__getitem__)]
        rows = _fill_rows(parts, capacity, runs)
        if max_rows is None or len(rows) <= max_rows:
            return rows
    return _fill_rows(parts, capacity, [[position] for position in range(len(parts))])


def _fill_rows(parts: list[dict[Hashable, int]], capacity: int, runs: list[list[int]]) -> list[list[int]]:
    rows: list[list[int]] = []
    held: dict[Hashable, int] = {}
    free = -1  # no row is open yet: anything "does not fit"

    def cost(positions: list[int]) -> dict[Hashable, int]:
        union: dict[Hashable, int] = {}
        for position in positions:
            union.update(parts[position])
        return union

    for run in runs:
        whole = cost(run)
        added = sum(tokens for key, tokens in whole.items() if key not in held)
        if added > free and sum(whole.values()) <= capacity:
            rows.append([])
            held, free, added = {}, capacity, sum(whole.values())
        if added <= free:
            rows[-1] += run
            held.update(whole)
            free -= added
            continue
        for position in run:  # a run longer than a row: example by example
            added = sum(tokens for key, tokens in parts[position].items() if key not in held)
            if added > free:
                rows.append([])
                held, free, added = {}, capacity, sum(parts[position].values())
            rows[-1].append(position)
            held.update(parts[position])
            free -= added
    return rows


def prompt_units(
    prompts: Sequence[Hashable],
    lengths: Sequence[Size],
    capacity: int,
    prefixes: Sequence[Hashable] | None = None,
) -> list[list[int]]:
    """The pairs of each prompt, as units a batch sampler keeps together; a group that does not fit is split.

    ``prompts[i]`` identifies example ``i``'s prompt (equal for equal prompt tokens). Groups come in order of their
    first pair; a group's pairs stay in dataset order. The split rule: a group whose pairs do not fit ``capacity`` is
    cut by :func:`next_fit` over its pairs in dataset order, into consecutive chunks that each take as many pairs as
    fit (so every chunk but the last is full). ``lengths`` and ``capacity`` are in tokens for packed rows (given as
    parts, so that a chunk's prompt counts once), or in pairs for unpacked batches (every size 1, ``capacity`` the
    batch size).

    ``prefixes`` (a key per example, equal for equal prompts: ``collators.prompt_row_key``) then gathers the units of
    one key into larger ones: best fit decreasing packs them into as few units as fit ``capacity``, each holding
    whole units in order of their first pair. Unpacked, the collator lays out the examples of a batch that share a
    key as one tree, so a gathered unit runs its common prefix (a long system prompt) once. A shuffling
    :class:`PackedBatchSampler` gathers the chunks of a key anew every epoch.

    >>> prompt_units(["a", "b", "a", "a"], [1, 1, 1, 1], capacity=2)
    [[0, 2], [3], [1]]
    >>> prompt_units(["a", "b", "c", "a"], [1, 1, 1, 1], capacity=3, prefixes=["s", "t", "s", "s"])
    [[0, 3, 2], [1]]
    """
    if len(prompts) != len(lengths):
        raise ValueError(f"{len(prompts)} prompt keys for {len(lengths)} examples")
    groups: dict[Hashable, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    units: list[list[int]] = []
    for members in groups.values():
        units += [[members[p] for p in chunk] for chunk in next_fit([lengths[i] for i in members], capacity)]
    return units if prefixes is None else _gathered(units, lengths, capacity, prefixes)


def _gathered(
    chunks: Sequence[list[int]], lengths: Sequence[Size], capacity: int, prefixes: Sequence[Hashable]
) -> list[list[int]]:
    """The chunks of each prefix key packed by best fit into units of at most ``capacity`` (:func:`prompt_units`)."""
    if len(prefixes) != len(lengths):
        raise ValueError(f"{len(prefixes)} prefix keys for {len(lengths)} examples")
    by_prefix: dict[Hashable, list[list[int]]] = {}
    for chunk in chunks:
        by_prefix.setdefault(prefixes[chunk[0]], []).append(chunk)
    gathered: list[list[int]] = []
    for members in by_prefix.values():
        sizes = [[size for i in unit for size in _parts(lengths[i], i).items()] for unit in members]
        parts = _shared_parts(sizes)
        tokens = [row_tokens([size]) for size in sizes]
        for row in _planned_rows(range(len(members)), tokens, capacity, parts):
            gathered.append([index for unit in sorted(row) for index in members[unit]])
    return gathered


def _swap_classes(
    chunks: Sequence[list[int]], lengths: Sequence[Size], prefixes: Sequence[Hashable]
) -> list[list[list[int]]]:
    """Chunks that can trade places in any packing: those of one prefix key whose pairs have the same sizes in order.

    Best fit, in whichever order it takes the chunks, only ever looks at their sizes, so gathering the chunks of a key
    after shuffling those of equal sizes gives the same units, each chunk's place taken by one of its class. Swapping
    the chunks of a class in the fixed gathering is therefore the regathering of a shuffled epoch, and it leaves every
    size, and so every count the sampler plans (units, rows, batches), as it was. Shuffling the chunks of a key freely
    would not: the gathering keeps the better of longest first and the given order, and the given order's count
    depends on it (capacity 8, chunks of 8, 2, 2, 4, 3, 2, 3 pairs: three units in that order, four in decreasing
    order), while the batch count must hold for the whole run. Returns the classes of at least two chunks.
    """
    classes: dict[tuple[Hashable, tuple[Hashable, ...]], list[list[int]]] = {}
    for chunk in chunks:
        # Parts become tuples: a size given as a list of parts does not hash.
        sizes = tuple(lengths[i] if isinstance(lengths[i], int) else tuple(map(tuple, lengths[i])) for i in chunk)
        classes.setdefault((prefixes[chunk[0]], sizes), []).append(chunk)
    return [members for members in classes.values() if len(members) > 1]


def packing_statistics(
    lengths: Sequence[int], capacity: int, rows: Sequence[Sequence[int]] | None = None
) -> dict[str, Any]:
    """How well ``lengths`` pack into rows of ``capacity`` tokens (with :func:`pack_rows`, or the given ``rows``).

    ``packing_efficiency`` is the non-padding share of the row tokens, ``sum(lengths) / (rows * capacity)``;
    ``padding_share`` is its complement. With ``rows`` given, only the examples in them are counted.

    >>> packing_statistics([6, 4, 5, 5], capacity=10)["packing_efficiency"]
    1.0
    """
    values = _checked_lengths(lengths, capacity)
    if rows is None:
        rows = _best_fit(_by_decreasing_length(range(len(values)), values), values, capacity)
    num_examples = sum(len(row) for row in rows)
    tokens = sum(values[i] for row in rows for i in row)
    efficiency = tokens / (len(rows) * capacity) if rows else 0.0
    return {
        "num_examples": num_examples,
        "num_rows": len(rows),
        "capacity": capacity,
        "tokens": tokens,
        "mean_examples_per_row": num_examples / len(rows) if rows else 0.0,
        "packing_efficiency": efficiency,
        "padding_share": 1.0 - efficiency if rows else 0.0,
    }


def _percentile(ordered: Sequence[int], fraction: Fraction) -> Fraction:
    # Linear interpolation between closest ranks (numpy's default), in exact arithmetic so that a rule such as
    # "1.1 x p95, rounded up to a multiple of 128" does not flip on a float rounding error.
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def auto_packing_length(
    lengths: Sequence[int], examples_per_row: int = 4, multiple: int = 128
) -> tuple[int, dict[str, Any]]:
    """Packing length from the length distribution: ``ceil_multiple(1.1 * p95) * examples_per_row``.

    Never below the longest example rounded up to ``multiple``, so that every example fits. Returns the length and
    the statistics behind it, including how the examples pack at that length.

    >>> auto_packing_length([3600] * 20)[0]  # 1.1 * 3600 = 3960 -> 3968 (a multiple of 128) -> x 4
    15872
    """
    if not lengths:
        raise ValueError("auto_packing_length needs at least one example length")
    if examples_per_row < 1 or multiple < 1:
        raise ValueError(f"examples_per_row ({examples_per_row}) and multiple ({multiple}) must be positive")
    ordered = sorted(int(length) for length in lengths)
    median = _percentile(ordered, Fraction(1, 2))
    p95 = _percentile(ordered, Fraction(95, 100))
    per_example = math.ceil(Fraction(11, 10) * p95 / multiple) * multiple
    longest_rounded = math.ceil(ordered[-1] / multiple) * multiple
    length = max(per_example * examples_per_row, longest_rounded)
    stats = packing_statistics(lengths, length)
    return length, {
        "median": float(median),
        "p95": float(p95),
        "max": ordered[-1],
        "per_example_length": per_example,
        "examples_per_row": examples_per_row,
        "packing_length": length,
        "raised_to_longest": length > per_example * examples_per_row,
        "num_rows": stats["num_rows"],
        "mean_examples_per_row": stats["mean_examples_per_row"],
        "packing_efficiency": stats["packing_efficiency"],
        "padding_share": stats["padding_share"],
    }


class _EpochRelay(Sampler[int]):
    """The ``sampler`` attribute of :class:`PackedBatchSampler`: the epoch's example order, and a way in for epochs.

    accelerate's ``DataLoaderShard.set_epoch`` does not call ``set_epoch`` on the batch sampler that its
    ``BatchSamplerShard`` wraps, only on ``batch_sampler.batch_sampler.sampler``; this object is that ``sampler``.
    """

    def __init__(self, owner: PackedBatchSampler) -> None:
        super().__init__()
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for batch in self._owner:
            yield from batch

    def __len__(self) -> int:
        return self._owner.num_examples_per_epoch


class PackedBatchSampler(Sampler[list[int]]):
    """Yields, per step of one process, the dataset indices of up to ``rows_per_batch`` packed rows, row by row.

    Not rank-aware: give it the number of processes and let accelerate deal the batches out (batch ``i`` to process
    ``i % num_processes``). ``len(self)`` is fixed at construction and is a multiple of ``num_processes``.

    ``lengths`` gives each example's length, or its parts (see the module docstring). ``prompts`` (a key per example,
    ``--group_by_prefix``) keeps the examples of one prompt together: they become units (:func:`prompt_units`, which
    also says how a group larger than a row is split, and how ``prefixes`` gather the units whose prompts share a
    prefix into larger ones), and everything below that speaks of examples is done with
    units, a unit's length being the tokens its examples take together in a row. Should the processes need more
    batches than there are units (40 groups that each fill a batch, on 3 processes, need 42 batches), the unit with
    the most examples is cut in two halves, in order, until there are enough; ``self.units`` holds the units used.
    A unit's examples are yielded one after the other, so that the collator's :func:`next_fit` keeps them in one row.
    Shuffled, the gathering by ``prefixes`` changes every epoch: the chunks of one key whose pairs have the same sizes
    trade places in ``self.units`` at random (:func:`_swap_classes`), which leaves every size, and so the plan below,
    as it is.

    Every epoch (deterministic for ``seed + epoch``) the examples are shuffled, packed by best-fit decreasing within
    windows of ``window_size`` shuffled examples (so that which examples share a row changes from epoch to epoch),
    the least-full rows are repacked together across windows, and the rows are shuffled and grouped into batches.
    Should an epoch's packing ever need more rows than the fixed number of batches can hold, that epoch falls back
    to packing all examples at once, which gives exactly the row count the batch count was computed from. With parts
    the order of equal lengths matters, and should that pass still need more rows, the epoch takes the very rows the
    count was computed from.

    The number of batches is ``ceil(rows / rows_per_batch)`` rounded up to a multiple of ``num_processes``, where
    ``rows`` is the count of a best-fit-decreasing packing of the whole dataset. When an epoch's rows do not fill every
    batch, rows with several examples are split (each part still fits) until every batch has at least one row; the
    batches at the end of an epoch then hold fewer than ``rows_per_batch`` rows. No example is repeated or left out.
    This needs at least as many examples as batches: ``ValueError`` otherwise (e.g. 3 examples on 4 processes).

    ``drop_last=True`` instead plans ``rows_per_batch`` rows for every batch: ``floor(rows / rows_per_batch)``
    batches rounded down to a multiple of ``num_processes``, the leftover rows (fewer than ``rows_per_batch *
    num_processes`` of them, chosen at random each epoch) being skipped.

    ``shuffle=False`` (evaluation) packs the whole dataset at once, orders each row's examples and the rows by dataset
    index and batches the rows in that order; it is the same for every epoch.

    Epochs: ``set_epoch`` on an accelerate-prepared loader reaches this sampler through its ``sampler`` attribute (see
    ``_EpochRelay``), and the prepared loader also sets the epoch itself at each pass. A loader rebuilt by
    ``accelerate.skip_first_batches`` (resuming mid-epoch) on several processes does not pass it on: call this
    sampler's ``set_epoch`` directly there, or the resumed epoch replays another epoch's order.

    Example (two processes, one row per batch; rows hold at most 10 tokens)::

        sampler = PackedBatchSampler([6, 4, 5, 5, 3, 9, 2], capacity=10, num_processes=2, shuffle=False)
        list(sampler)  # [[0, 1], [2, 3], [4, 6], [5]]: 4 batches, process 0 takes the 1st and 3rd

    Batches of whole groups without packing are the same plan with every pair of size 1 and ``capacity`` the batch
    size: a "row" is then a batch of up to ``capacity`` pairs (``rows_per_batch=1``).
    """

    def __init__(
        self,
        lengths: Sequence[Size],
        capacity: int,
        rows_per_batch: int = 1,
        num_processes: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        window_size: int = 4096,
        prompts: Sequence[Hashable] | None = None,
        prefixes: Sequence[Hashable] | None = None,
    ) -> None:
        super().__init__()
        if rows_per_batch < 1 or num_processes < 1 or window_size < 1:
            raise ValueError(
                f"rows_per_batch ({rows_per_batch}), num_processes ({num_processes}) and window_size ({window_size}) "
                "must be positive"
            )
        if prefixes is not None and prompts is None:
            raise ValueError("prefixes gather the units of pairs of one prompt, so they need prompts")
        self.sizes = list(lengths)
        self.lengths = _checked_lengths([row_tokens([size]) for size in self.sizes], capacity)
        self.capacity = capacity
        self.rows_per_batch = rows_per_batch
        self.num_processes = num_processes
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.window_size = window_size
        self.epoch = 0
        # Not `batch_size`: accelerate's BatchSamplerShard reads that attribute and, when it is set, treats shorter
        # batches as incomplete and tops them up with repeated examples.
        self.sampler = _EpochRelay(self)
        self.prompts = None if prompts is None else list(prompts)
        # Chunks of pairs that shuffled epochs trade places of (_swap_classes): none but with prefixes.
        self._swaps: list[list[list[int]]] = []
        if self.prompts is None:
            self.units = [[index] for index in range(len(self.sizes))]
        else:
            self.units = prompt_units(self.prompts, self.sizes, capacity)
            if prefixes is not None:
                self._swaps = _swap_classes(self.units, self.sizes, prefixes)
                self.units = _gathered(self.units, self.sizes, capacity, prefixes)
        self._unit_word = "example(s)"
        if prompts is not None:
            self._unit_word = f"group(s) of pairs {'of one prompt' if prefixes is None else 'sharing a prompt prefix'}"
        self.unit_lengths = [row_tokens([self.sizes[i] for i in unit]) for unit in self.units]
        self._example_parts = _shared_parts(self.sizes)
        self.unit_parts = self._parts_of(self.units)
        while True:
            self._reference_rows = _planned_rows(range(len(self.units)), self.unit_lengths, capacity, self.unit_parts)
            num_rows = len(self._reference_rows)
            batches = _ceil_div(_ceil_div(num_rows, rows_per_batch), num_processes) * num_processes
            if drop_last or batches <= len(self.units) or all(len(unit) == 1 for unit in self.units):
                break
            # More batches than units (say 40 groups on 3 processes need 42 batches): halve the unit with the most
            # examples, keeping its order, and plan again.
            largest = max(range(len(self.units)), key=lambda u: len(self.units[u]))
            unit = self.units[largest]
            self.units[largest : largest + 1] = [unit[: -(-len(unit) // 2)], unit[-(-len(unit) // 2) :]]
            self.unit_lengths[largest : largest + 1] = [
                row_tokens([self.sizes[i] for i in u]) for u in self.units[largest : largest + 2]
            ]
            if self.unit_parts is not None:
                self.unit_parts[largest : largest + 1] = self._parts_of(self.units[largest : largest + 2])
        if drop_last:
            self._num_batches = num_rows // rows_per_batch // num_processes * num_processes
            if self._num_batches == 0:
                raise ValueError(
                    f"with drop_last=True the {len(self.units)} {self._unit_word} pack into {num_rows} row(s), fewer "
                    f"than rows_per_batch * num_processes = {rows_per_batch * num_processes}: not one full step"
                )
            self._max_rows = num_rows
        else:
            self._num_batches = batches
            if self._num_batches > len(self.units):
                raise ValueError(
                    f"{len(self.units)} {self._unit_word} cannot fill {self._num_batches} batches: each of the "
                    f"{num_processes} processes must take the same number of non-empty batches without repeating "
                    "an example; use fewer processes or more examples, or drop_last=True"
                )
            self._max_rows = self._num_batches * rows_per_batch
        self._cache: tuple[int, list[list[list[int]]]] | None = None

    def _parts_of(self, units: list[list[int]]) -> list[dict[Hashable, int]] | None:
        """Each unit's parts (its examples' together), or ``None`` where examples are plain lengths."""
        if self._example_parts is None:
            return None
        return [{key: tokens for i in unit for key, tokens in self._example_parts[i].items()} for unit in units]

    def _load(self, row: list[int]) -> int:
        """Tokens a row of units takes: each distinct part once."""
        if self.unit_parts is None:
            return sum(self.unit_lengths[i] for i in row)
        return sum({key: tokens for i in row for key, tokens in self.unit_parts[i].items()}.values())

    @property
    def num_examples_per_epoch(self) -> int:
        """All examples, or with ``drop_last`` those in the rows kept this epoch."""
        return sum(len(row) for batch in self.batch_rows() for row in batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_rows():
            yield [index for row in batch for index in row]

    def batch_rows(self, epoch: int | None = None) -> list[list[list[int]]]:
        """The batches of ``epoch`` (default: the current one), each a list of rows of dataset indices.

        A batch's rows are exactly what :func:`next_fit` makes of the batch in the order it is yielded (with the
        prompts, when given, and at most ``rows_per_batch`` rows), as the collator does.
        """
        epoch = self.epoch if epoch is None else epoch
        key = epoch if self.shuffle else 0
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._plan(epoch))
        return self._cache[1]

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        # Rows and batches are planned over units (indices into self.units), then spelled out as dataset indices.
        units = self.units
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            if self._swaps:
                units = self._swapped(generator)
            order = torch.randperm(len(self.units), generator=generator).tolist()
            rows = self._windowed_rows(order)
            rows = [rows[r] for r in torch.randperm(len(rows), generator=generator).tolist()]
        else:
            rows = sorted((sorted(row) for row in self._reference_rows), key=lambda row: row[0])
        rows = self._to_row_count(rows, keep_order=not self.shuffle)
        batches: list[list[list[int]]] = []
        start = 0
        for size in self._batch_sizes(len(rows)):
            batch = rows[start : start + size]
            start += size
            if self.shuffle:
                batch = self._ordered_for_next_fit(batch, units)
            flat = [index for row in batch for unit in row for index in units[unit]]
            prompts = None if self.prompts is None else [self.prompts[i] for i in flat]
            refit = next_fit([self.sizes[i] for i in flat], self.capacity, prompts, self.rows_per_batch)
            batches.append([[flat[p] for p in row] for row in refit])
        return batches

    def _swapped(self, generator: torch.Generator) -> list[list[int]]:
        """``self.units`` with each chunk of a swap class in the place of a random chunk of its class: the gathering
        of the epoch's shuffled chunks. Every example keeps the size of the one whose place it takes, so the plan over
        units holds as it is."""
        moved = list(range(len(self.sizes)))
        for chunks in self._swaps:
            for place, taken in zip(chunks, torch.randperm(len(chunks), generator=generator).tolist(), strict=True):
                for index, example in zip(place, chunks[taken], strict=True):
                    moved[index] = example
        return [[moved[index] for index in unit] for unit in self.units]

    def _windowed_rows(self, order: list[int]) -> list[list[int]]:
        """Best-fit decreasing within windows of the shuffled ``order``, doubling the windows if needed.

        Windows make which examples share a row change from epoch to epoch; a whole-dataset pass would only vary
        among examples of equal length. Windows cost a few rows (their last rows are part-filled); should that be
        more than the fixed batch count can hold, the windows grow until a single one holds every example, which gives
        exactly the reference row count for plain lengths (best fit is blind to which of two equal lengths comes
        first). Parts are not blind to it (which row holds a shared part depends on it): should the single window
        still need more rows, the epoch takes the reference rows.
        """
        lengths, capacity, parts = self.unit_lengths, self.capacity, self.unit_parts
        size = self.window_size
        while True:
            if size >= len(order):
                rows = _planned_rows(order, lengths, capacity, parts)
                return rows if len(rows) <= self._max_rows else [list(row) for row in self._reference_rows]
            rows = []
            for start in range(0, len(order), size):
                rows.extend(_planned_rows(order[start : start + size], lengths, capacity, parts))
            # Pool the examples of the least full rows of all windows and best-fit them, longest first, into the free
            # space of the other rows and new rows: this wins back part of what the window boundaries cost.
            loads = [self._load(row) for row in rows]
            dissolve = set(sorted(range(len(rows)), key=loads.__getitem__)[: 8 * _ceil_div(len(order), size)])
            kept = [row for r, row in enumerate(rows) if r not in dissolve]
            position = {index: p for p, index in enumerate(order)}
            pooled = sorted((i for r in dissolve for i in rows[r]), key=position.__getitem__)
            rows = _planned_rows(pooled, lengths, capacity, parts, kept)
            if len(rows) <= self._max_rows:
                return rows
            size *= 2

    def _to_row_count(self, rows: list[list[int]], keep_order: bool) -> list[list[int]]:
        """Split rows (``drop_last``: or drop the last ones) until there are as many as the fixed batches take.

        The parts of a split row stay next to each other with ``keep_order``; otherwise the new parts go last.
        """
        needed = self._num_batches * (self.rows_per_batch if self.drop_last else 1)
        if self.drop_last and len(rows) > needed:
            return rows[:needed]
        if len(rows) >= needed:
            return rows
        # Split the rows with the most examples first: their parts still hold several examples each.
        pieces = [list(row) for row in rows]
        origin = list(range(len(rows)))
        heap = [(-len(row), r) for r, row in enumerate(pieces) if len(row) > 1]
        heapq.heapify(heap)
        while len(pieces) < needed:
            _, r = heapq.heappop(heap)  # cannot run dry: there are at least as many examples as rows needed
            first, second = self._halves(pieces[r])
            pieces[r] = first
            pieces.append(second)
            origin.append(origin[r])
            for at in (r, len(pieces) - 1):
                if len(pieces[at]) > 1:
                    heapq.heappush(heap, (-len(pieces[at]), at))
        if keep_order:
            return [pieces[p] for p in sorted(range(len(pieces)), key=origin.__getitem__)]
        return pieces

    def _halves(self, row: list[int]) -> tuple[list[int], list[int]]:
        # Longest first, each example to the lighter half: two parts of about equal tokens, both non-empty.
        first: list[int] = []
        second: list[int] = []
        loads = [0, 0]
        for index in _by_decreasing_length(row, self.unit_lengths):
            side = 0 if loads[0] <= loads[1] else 1
            (first if side == 0 else second).append(index)
            loads[side] += self.unit_lengths[index]
        return first, second

    def _batch_sizes(self, num_rows: int) -> list[int]:
        """Rows per batch: full batches first, then the rest spread so that every batch has at least one row."""
        extra = num_rows - self._num_batches
        sizes = []
        for _ in range(self._num_batches):
            take = min(self.rows_per_batch - 1, extra)
            sizes.append(1 + take)
            extra -= take
        return sizes

    def _ordered_for_next_fit(self, batch: list[list[int]], units: list[list[int]]) -> list[list[int]]:
        # Next-fit leaves the plan only where row b's first example fits in the free space of row a before it: putting
        # the fullest rows first (least free space) and each row's longest example first keeps that from happening.
        loads = [self._load(row) for row in batch]
        order = sorted(range(len(batch)), key=lambda r: -loads[r])
        rows = [_by_decreasing_length(batch[r], self.unit_lengths) for r in order]
        if self.prompts is not None:
            # Two units of one prompt (parts of a group larger than a row) must not meet at a row boundary, where
            # next-fit would take them for one run: start the next row with a unit of another prompt where it has one.
            prompt_of = [self.prompts[unit[0]] for unit in units]
            for before, row in itertools.pairwise(rows):
                other = next((u for u in row if prompt_of[u] != prompt_of[before[-1]]), None)
                if other is not None and prompt_of[row[0]] == prompt_of[before[-1]]:
                    row.remove(other)
                    row.insert(0, other)
        return rows


class PackedStream(IterableDataset):
    """Packs a stream of examples into batches of packed rows with a bounded look-ahead: the batches of every process.

    The stream is read ``window_size`` examples at a time. Each window is packed on its own by a
    :class:`PackedBatchSampler` (best-fit decreasing over the window's examples, shuffled when ``shuffle``), which
    gives each example exactly once and a multiple of ``num_processes`` batches. A window is held back until the next
    one is full, so a last, short window joins the one before it (at most ``2 * window_size`` examples are held):
    only a stream too short to give every process a batch is an error, as for :class:`PackedBatchSampler`. Items
    are lists of examples, one batch each, every process's in turn: batch ``i`` belongs to process
    ``i % num_processes``, which is how accelerate deals out the items of a stream (one item per step and process).

    Deterministic for ``seed`` and the epoch (``set_epoch``, also passed on to the stream, so that a shuffled
    ``datasets.IterableDataset`` reshuffles). ``length(example)`` gives an example's tokens; an example longer than
    ``capacity`` is a ``ValueError`` naming its position in the stream.

    >>> stream = PackedStream([{"n": n} for n in (6, 4, 5, 5, 3)], lambda e: e["n"], capacity=10, shuffle=False)
    >>> [[e["n"] for e in batch] for batch in stream]
    [[6, 4], [5, 5], [3]]
    """

    def __init__(
        self,
        examples: Iterable[dict[str, Any]],
        length: Callable[[dict[str, Any]], Size],
        capacity: int,
        rows_per_batch: int = 1,
        num_processes: int = 1,
        window_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        name: str = "streamed",
    ) -> None:
        super().__init__()
        if window_size < 1:
            raise ValueError(f"window_size must be at least 1 example, got {window_size}")
        self.examples = examples
        self.length = length
        self.capacity = capacity
        self.rows_per_batch = rows_per_batch
        self.num_processes = num_processes
        self.window_size = window_size
        self.shuffle = shuffle
        self.seed = seed
        self.name = name
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.examples, "set_epoch"):
            self.examples.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        # One draw per window from a generator seeded by (seed, epoch): windows of one epoch are shuffled differently.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        held: list[tuple[dict[str, Any], Size]] = []
        window: list[tuple[dict[str, Any], Size]] = []
        for position, example in enumerate(self.examples):
            size = self.length(example)
            if row_tokens([size]) > self.capacity:
                raise ValueError(
                    f"Example {position} of the {self.name} dataset (in stream order) takes {row_tokens([size])} "
                    f"tokens, more than "
                    f"--packing_length {self.capacity}. Raise --packing_length, or lower --max_length to truncate "
                    "examples."
                )
            window.append((example, size))
            if len(window) == self.window_size:
                yield from self._batches(held, generator)
                held, window = window, []
        yield from self._batches(held + window, generator)

    def _batches(
        self, window: list[tuple[dict[str, Any], Size]], generator: torch.Generator
    ) -> Iterator[list[dict[str, Any]]]:
        if not window:
            return
        sampler = PackedBatchSampler(
            [size for _, size in window],
            self.capacity,
            rows_per_batch=self.rows_per_batch,
            num_processes=self.num_processes,
            shuffle=self.shuffle,
            seed=int(torch.randint(2**31, (1,), generator=generator)),
            window_size=len(window),
        )
        for batch in sampler:
            yield [window[i][0] for i in batch]
