"""Packing of DPO examples into rows of at most ``capacity`` tokens, and a batch sampler that yields packed rows.

Each example has a known token length (computed elsewhere). :func:`pack_rows` bin-packs examples into rows,
:class:`PackedBatchSampler` turns an epoch's packing into batches of ``rows_per_batch`` rows, and the collator splits a
batch back into rows with :func:`next_fit`. The sampler is not rank-aware: accelerate's ``BatchSamplerShard`` deals
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
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler

__all__ = [
    "PackedBatchSampler",
    "PackedStream",
    "auto_packing_length",
    "next_fit",
    "pack_rows",
    "packing_statistics",
]


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


def _best_fit(
    order: Sequence[int],
    lengths: Sequence[int],
    capacity: int,
    rows: list[list[int]] | None = None,
) -> list[list[int]]:
    """Best-fit of ``order`` (already in placement order, normally by decreasing length) into ``rows`` plus new rows.

    The free space of the open rows is kept in one sorted list of ``free * stride + row`` integers, so finding the
    tightest row that takes an example is a bisect; ties in free space go to the oldest row, as in first-fit. A row
    whose free space is below the shortest example still to be placed can never take one again and leaves the list,
    which keeps it short. Returns ``rows`` extended in place (the new rows appended in the order they were opened).
    """
    rows = [] if rows is None else rows
    if not order:
        return rows
    stride = len(rows) + len(order) + 1
    shortest = min(lengths[i] for i in order)
    frees = [capacity - sum(lengths[i] for i in row) for row in rows]
    free_keys = sorted(free * stride + r for r, free in enumerate(frees) if free >= shortest)
    for index in order:
        size = lengths[index]
        at = bisect_left(free_keys, size * stride)
        if at < len(free_keys):
            key = free_keys.pop(at)
            row, free = key % stride, key // stride - size
            rows[row].append(index)
        else:
            row, free = len(rows), capacity - size
            rows.append([index])
        if free >= shortest:
            insort(free_keys, free * stride + row)
    return rows


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _by_decreasing_length(indices: Sequence[int], lengths: Sequence[int]) -> list[int]:
    # Python's sort is stable also with reverse=True, so equal lengths keep the order they came in: a shuffled input
    # gives random tie-breaking, a dataset-ordered input a deterministic one.
    return sorted(indices, key=lengths.__getitem__, reverse=True)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack example indices into rows of at most ``capacity`` tokens with best-fit decreasing.

    Best-fit decreasing has first-fit-decreasing's guarantee (at most ``11/9 * optimal + 6/9`` rows) and in practice
    packs at least as tightly. It runs in ``O(n log n)`` plus list moves in C (100k examples: about 0.1 s). Every
    index appears exactly once; rows are in the order they were opened, each row's examples longest first.

    >>> pack_rows([5, 3, 4, 2, 6], capacity=10)
    [[4, 2], [0, 1, 3]]

    Raises ``ValueError`` for an example longer than ``capacity`` (naming it and the smallest capacity that fits all).
    """
    values = _checked_lengths(lengths, capacity)
    return _best_fit(_by_decreasing_length(range(len(values)), values), values, capacity)


def next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Split positions ``0..n-1`` of ``lengths`` into consecutive rows, a new one when the next example does not fit.

    This is what the collator does with a batch; order is kept.

    >>> next_fit([4, 5, 2, 7, 3], capacity=10)
    [[0, 1], [2, 3], [4]]
    """
    values = _checked_lengths(lengths, capacity)
    rows: list[list[int]] = []
    free = -1  # no row is open yet: anything "does not fit"
    for position, size in enumerate(values):
        if size > free:
            rows.append([])
            free = capacity
        rows[-1].append(position)
        free -= size
    return rows


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

    Every epoch (deterministic for ``seed + epoch``) the examples are shuffled, packed by best-fit decreasing within
    windows of ``window_size`` shuffled examples (so that which examples share a row changes from epoch to epoch),
    the least-full rows are repacked together across windows, and the rows are shuffled and grouped into batches.
    Should an epoch's packing ever need more rows than the fixed number of batches can hold, that epoch falls back
    to packing all examples at once, which gives exactly the row count the batch count was computed from.

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
    """

    def __init__(
        self,
        lengths: Sequence[int],
        capacity: int,
        rows_per_batch: int = 1,
        num_processes: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        window_size: int = 4096,
    ) -> None:
        super().__init__()
        if rows_per_batch < 1 or num_processes < 1 or window_size < 1:
            raise ValueError(
                f"rows_per_batch ({rows_per_batch}), num_processes ({num_processes}) and window_size ({window_size}) "
                "must be positive"
            )
        self.lengths = _checked_lengths(lengths, capacity)
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

        self._reference_rows = _best_fit(
            _by_decreasing_length(range(len(self.lengths)), self.lengths), self.lengths, capacity
        )
        num_rows = len(self._reference_rows)
        if drop_last:
            self._num_batches = num_rows // rows_per_batch // num_processes * num_processes
            if self._num_batches == 0:
                raise ValueError(
                    f"with drop_last=True the {len(self.lengths)} examples pack into {num_rows} row(s), fewer than "
                    f"rows_per_batch * num_processes = {rows_per_batch * num_processes}: not one full step"
                )
            self._max_rows = num_rows
        else:
            self._num_batches = _ceil_div(_ceil_div(num_rows, rows_per_batch), num_processes) * num_processes
            if self._num_batches > len(self.lengths):
                raise ValueError(
                    f"{len(self.lengths)} example(s) cannot fill {self._num_batches} batches: each of the "
                    f"{num_processes} processes must take the same number of non-empty batches without repeating "
                    "an example; use fewer processes or more examples, or drop_last=True"
                )
            self._max_rows = self._num_batches * rows_per_batch
        self._cache: tuple[int, list[list[list[int]]]] | None = None

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

        A batch's rows are exactly what :func:`next_fit` makes of the batch's lengths in the order it is yielded.
        """
        epoch = self.epoch if epoch is None else epoch
        key = epoch if self.shuffle else 0
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._plan(epoch))
        return self._cache[1]

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
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
                batch = self._ordered_for_next_fit(batch)
            flat = [index for row in batch for index in row]
            refit = next_fit([self.lengths[i] for i in flat], self.capacity)
            batches.append([[flat[p] for p in row] for row in refit])
        return batches

    def _windowed_rows(self, order: list[int]) -> list[list[int]]:
        """Best-fit decreasing within windows of the shuffled ``order``, doubling the windows if needed.

        Windows make which examples share a row change from epoch to epoch; a whole-dataset pass would only vary
        among examples of equal length. Windows cost a few rows (their last rows are part-filled); should that be
        more than the fixed batch count can hold, the windows grow until a single one holds every example, which gives
        exactly the reference row count (best fit is blind to which of two equal lengths comes first).
        """
        lengths, capacity = self.lengths, self.capacity
        size = self.window_size
        while True:
            if size >= len(order):
                return _best_fit(_by_decreasing_length(order, lengths), lengths, capacity)
            rows: list[list[int]] = []
            for start in range(0, len(order), size):
                window = _by_decreasing_length(order[start : start + size], lengths)
                rows.extend(_best_fit(window, lengths, capacity))
            # Pool the examples of the least full rows of all windows and best-fit them, longest first, into the free
            # space of the other rows and new rows: this wins back part of what the window boundaries cost.
            loads = [sum(lengths[i] for i in row) for row in rows]
            dissolve = set(sorted(range(len(rows)), key=loads.__getitem__)[: 8 * _ceil_div(len(order), size)])
            kept = [row for r, row in enumerate(rows) if r not in dissolve]
            position = {index: p for p, index in enumerate(order)}
            pooled = sorted((i for r in dissolve for i in rows[r]), key=position.__getitem__)
            rows = _best_fit(_by_decreasing_length(pooled, lengths), lengths, capacity, kept)
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
        for index in _by_decreasing_length(row, self.lengths):
            side = 0 if loads[0] <= loads[1] else 1
            (first if side == 0 else second).append(index)
            loads[side] += self.lengths[index]
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

    def _ordered_for_next_fit(self, batch: list[list[int]]) -> list[list[int]]:
        # Next-fit leaves the plan only where row b's first example fits in the free space of row a before it: putting
        # the fullest rows first (least free space) and each row's longest example first keeps that from happening.
        loads = [sum(self.lengths[i] for i in row) for row in batch]
        order = sorted(range(len(batch)), key=lambda r: -loads[r])
        return [_by_decreasing_length(batch[r], self.lengths) for r in order]


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
        length: Callable[[dict[str, Any]], int],
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
        held: list[tuple[dict[str, Any], int]] = []
        window: list[tuple[dict[str, Any], int]] = []
        for position, example in enumerate(self.examples):
            size = self.length(example)
            if size > self.capacity:
                raise ValueError(
                    f"Example {position} of the {self.name} dataset (in stream order) takes {size} tokens, more than "
                    f"--packing_length {self.capacity}. Raise --packing_length, or lower --max_length to truncate "
                    "examples."
                )
            window.append((example, size))
            if len(window) == self.window_size:
                yield from self._batches(held, generator)
                held, window = window, []
        yield from self._batches(held + window, generator)

    def _batches(
        self, window: list[tuple[dict[str, Any], int]], generator: torch.Generator
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
