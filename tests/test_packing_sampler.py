"""Tests for packing.py: bin packing, next-fit, the packed batch sampler (also through accelerate), the length rule."""

import itertools
import math
import random
import re
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import packing
from collators import (
    MIN_SHARED_PREFIX,
    PrefixSharingCollator,
    layout_sizes,
    prompt_row_key,
    prompt_rows,
    shared_sequence_length,
)
from packing import (
    PackedBatchSampler,
    auto_packing_length,
    next_fit,
    pack_rows,
    packing_statistics,
    prompt_units,
    row_tokens,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def lognormal_lengths(n: int, seed: int = 0, max_length: int = 8192) -> list[int]:
    """Token lengths shaped like chat preference data: median ~1200, p95 ~3500, a long tail cut at ``max_length``."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(n).log_normal_(math.log(1200), 0.65, generator=generator)
    return [min(max_length, max(32, int(value))) for value in values.tolist()]


def expected_batches(lengths: list[int], capacity: int, rows_per_batch: int, num_processes: int) -> int:
    steps = -(-len(pack_rows(lengths, capacity)) // rows_per_batch)
    return -(-steps // num_processes) * num_processes


def flat(batches: list[list[list[int]]]) -> list[int]:
    return [index for batch in batches for row in batch for index in row]


def check_epoch(sampler: PackedBatchSampler, epoch: int) -> list[list[int]]:
    """Invariants of one epoch; returns the yielded batches."""
    sampler.set_epoch(epoch)
    yielded = list(sampler)
    planned = sampler.batch_rows(epoch)
    assert len(yielded) == len(sampler) == len(planned)
    assert len(sampler) % sampler.num_processes == 0
    lengths, capacity = sampler.lengths, sampler.capacity
    for batch, rows in zip(yielded, planned, strict=True):
        assert batch and batch == [index for row in rows for index in row]
        assert 1 <= len(rows) <= sampler.rows_per_batch
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        # What the collator does with the batch gives back exactly the planned rows.
        assert [[batch[p] for p in row] for row in next_fit([lengths[i] for i in batch], capacity)] == rows
    seen = [index for batch in yielded for index in batch]
    assert len(seen) == len(set(seen))
    if not sampler.drop_last:
        assert sorted(seen) == list(range(len(lengths)))
    return yielded


# --- pack_rows / next_fit ---------------------------------------------------------------------------------------


@FAST
@given(st.integers(1, 60).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=80))))
def test_pack_rows_places_every_example_once_within_capacity(case: tuple[int, list[int]]) -> None:
    capacity, lengths = case
    rows = pack_rows(lengths, capacity)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(row and sum(lengths[i] for i in row) <= capacity for row in rows)
    # No two rows could be merged: best fit only opens a row when no open one can take the example.
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def executed_lines(module: ModuleType, call: Callable[[], object]) -> int:
    """The lines of ``module``'s code that ``call()`` executes: its Python-level steps, counted the same on any machine
    under any load."""
    source, count = module.__file__, 0

    def in_module(frame, event, arg):
        nonlocal count
        count += event == "line"
        return in_module

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: in_module if frame.f_code.co_filename == source else None)
    try:
        call()
    finally:
        sys.settrace(previous)
    return count


def test_pack_rows_steps_grow_as_n_log_n() -> None:
    """Best-fit decreasing is a sort and a bisect per example (the list moves of the bisect's insert and pop run in
    C): ten times the examples take at most 15 times the Python-level steps (n log n: 13 here), where scanning the open
    rows for each example would take about 100 times."""
    small, large = (lognormal_lengths(n, max_length=16384) for n in (2_000, 20_000))
    steps = [executed_lines(packing, lambda lengths=lengths: pack_rows(lengths, 16384)) for lengths in (small, large)]
    assert steps[1] <= 15 * steps[0], steps


def test_pack_rows_packs_100k_examples_tightly() -> None:
    lengths = lognormal_lengths(100_000, max_length=16384)
    assert packing_statistics(lengths, 16384, pack_rows(lengths, 16384))["padding_share"] < 0.01


@pytest.mark.parametrize("packer", [pack_rows, next_fit])
def test_over_long_example_names_index_length_and_smallest_capacity(packer) -> None:
    with pytest.raises(ValueError, match=r"example 2 has 12 tokens.*capacity 10.*smallest capacity .* is 15"):
        packer([3, 4, 12, 15, 1], 10)
    with pytest.raises(ValueError, match="example 2 has 12 tokens"):
        PackedBatchSampler([3, 4, 12, 15, 1], capacity=10)


@FAST
@given(st.integers(1, 40).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))))
def test_next_fit_keeps_order_and_fills_greedily(case: tuple[int, list[int]]) -> None:
    capacity, lengths = case
    rows = next_fit(lengths, capacity)
    assert [p for row in rows for p in row] == list(range(len(lengths)))
    loads = [sum(lengths[p] for p in row) for row in rows]
    assert all(load <= capacity for load in loads)
    assert all(loads[r] + lengths[rows[r + 1][0]] > capacity for r in range(len(rows) - 1))


# --- the sampler ---------------------------------------------------------------------------------------------------

sampler_cases = st.integers(4, 48).flatmap(
    lambda cap: st.fixed_dictionaries(
        {
            "lengths": st.lists(st.integers(1, cap), max_size=70),
            "capacity": st.just(cap),
            "rows_per_batch": st.integers(1, 4),
            "num_processes": st.integers(1, 4),
            "shuffle": st.booleans(),
            "seed": st.integers(0, 2**16),
            "drop_last": st.booleans(),
            # Small windows exercise the windowed packing and its fallback to bigger windows.
            "window_size": st.integers(1, 24),
        }
    )
)


@FAST
@given(sampler_cases, st.integers(0, 5))
def test_sampler_epochs_cover_every_example_once_with_a_fixed_length(case: dict, epoch: int) -> None:
    lengths, capacity = case["lengths"], case["capacity"]
    rows_per_batch, num_processes = case["rows_per_batch"], case["num_processes"]
    if case["drop_last"]:
        full_steps = len(pack_rows(lengths, capacity)) // rows_per_batch // num_processes
        if full_steps == 0:
            with pytest.raises(ValueError, match="not one full step"):
                PackedBatchSampler(**case)
            return
        sampler = PackedBatchSampler(**case)
        assert len(sampler) == full_steps * num_processes
    else:
        batches = expected_batches(lengths, capacity, rows_per_batch, num_processes)
        if batches > len(lengths):
            with pytest.raises(ValueError, match="cannot fill"):
                PackedBatchSampler(**case)
            return
        sampler = PackedBatchSampler(**case)
        assert len(sampler) == batches
    check_epoch(sampler, epoch)
    check_epoch(sampler, epoch + 1)


def test_too_few_examples_for_the_processes() -> None:
    with pytest.raises(ValueError, match="3 example.*cannot fill 4 batches"):
        PackedBatchSampler([5, 5, 5], capacity=10, num_processes=4)
    # Splitting a row gives the fourth batch: no example repeated.
    sampler = PackedBatchSampler([2, 2, 2, 2], capacity=10, num_processes=4)
    assert [len(batch) for batch in check_epoch(sampler, 0)] == [1, 1, 1, 1]


def test_same_seed_and_epoch_same_batches_and_epochs_differ() -> None:
    lengths = lognormal_lengths(3000, seed=1)
    capacity, _ = auto_packing_length(lengths)
    first = PackedBatchSampler(lengths, capacity, rows_per_batch=2, num_processes=2, seed=7)
    second = PackedBatchSampler(lengths, capacity, rows_per_batch=2, num_processes=2, seed=7)
    for epoch in (0, 1):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        assert list(first) == list(second)
    assert list(first) == [[index for row in batch for index in row] for batch in first.batch_rows(1)]
    epoch0, epoch1 = first.batch_rows(0), first.batch_rows(1)
    assert len(epoch0) == len(epoch1)
    assert flat(epoch0) != flat(epoch1)
    # Not only the order: which examples share a row changes too.
    rows0 = {frozenset(row) for batch in epoch0 for row in batch}
    rows1 = {frozenset(row) for batch in epoch1 for row in batch}
    assert len(rows0 & rows1) < len(rows0) / 2
    other_seed = PackedBatchSampler(lengths, capacity, rows_per_batch=2, num_processes=2, seed=8)
    assert flat(other_seed.batch_rows(0)) != flat(epoch0)


def test_unshuffled_is_in_dataset_order_and_the_same_every_epoch() -> None:
    sampler = PackedBatchSampler([6, 4, 5, 5, 3, 9, 2], capacity=10, num_processes=2, shuffle=False)
    assert list(sampler) == [[0, 1], [2, 3], [4, 6], [5]]
    sampler.set_epoch(3)
    assert list(sampler) == [[0, 1], [2, 3], [4, 6], [5]]
    lengths = lognormal_lengths(500, seed=2)
    sampler = PackedBatchSampler(lengths, 8192, rows_per_batch=3, shuffle=False)
    firsts = [batch[0] for batch in sampler]
    assert firsts == sorted(firsts) and firsts[0] == 0
    check_epoch(sampler, 0)


def test_padding_share_is_low_on_realistic_lengths() -> None:
    lengths = lognormal_lengths(4000, seed=3)
    capacity, stats = auto_packing_length(lengths)
    assert stats["packing_efficiency"] > 0.9
    sampler = PackedBatchSampler(lengths, capacity, rows_per_batch=2, num_processes=4, seed=0)
    for epoch in (0, 1):
        rows = [row for batch in sampler.batch_rows(epoch) for row in batch]
        epoch_stats = packing_statistics(lengths, capacity, rows)
        assert epoch_stats["num_examples"] == len(lengths)
        assert epoch_stats["padding_share"] < 0.10
        assert epoch_stats["mean_examples_per_row"] > 4
    # Tighter rows (about two examples each) still pack well.
    capacity, _ = auto_packing_length(lengths, examples_per_row=2)
    rows = [row for batch in PackedBatchSampler(lengths, capacity, num_processes=8).batch_rows() for row in batch]
    assert packing_statistics(lengths, capacity, rows)["padding_share"] < 0.10


# --- through accelerate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("rows_per_batch", [1, 3])
def test_accelerate_ranks_take_equal_steps_and_disjoint_batches(num_processes: int, rows_per_batch: int) -> None:
    lengths = lognormal_lengths(401, seed=4)
    loaders, samplers = [], []
    for rank in range(num_processes):
        sampler = PackedBatchSampler(lengths, 8192, rows_per_batch=rows_per_batch, num_processes=num_processes)
        loader = DataLoader(list(range(len(lengths))), batch_sampler=sampler, collate_fn=list)
        loaders.append(prepare_data_loader(loader, num_processes=num_processes, process_index=rank))
        samplers.append(sampler)
    for epoch in (0, 1):
        per_rank = []
        for loader, sampler in zip(loaders, samplers, strict=True):
            loader.set_epoch(epoch)
            batches = list(loader)
            # set_epoch on the prepared loader reaches the sampler (through its `sampler` attribute).
            assert sampler.epoch == epoch
            assert len(batches) == len(loader) == len(sampler) // num_processes
            per_rank.append(batches)
        seen = [index for batches in per_rank for batch in batches for index in batch]
        assert sorted(seen) == list(range(len(lengths)))
        # Rank k gets batches k, k + W, ... of the sampler.
        assert [batch for step in zip(*per_rank, strict=True) for batch in step] == list(samplers[0])


def test_accelerate_advances_the_epoch_on_its_own() -> None:
    sampler = PackedBatchSampler(lognormal_lengths(200, seed=5), 8192, num_processes=2)
    loader = DataLoader(list(range(200)), batch_sampler=sampler, collate_fn=list)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=0)
    first, second = list(prepared), list(prepared)
    assert sampler.epoch == 1 and first != second


# --- the packing length rule --------------------------------------------------------------------------------------


def test_auto_packing_length_follows_the_rule() -> None:
    length, stats = auto_packing_length([3600] * 20)  # Capybara: p95 ~3600 -> 3968 x 4
    assert length == 15872 and stats["per_example_length"] == 3968 and stats["p95"] == 3600
    length, stats = auto_packing_length([100] * 99 + [20000])  # never below the longest example
    assert length == 20096 and stats["raised_to_longest"] and stats["max"] == 20000
    assert auto_packing_length(list(range(1, 101)), examples_per_row=1, multiple=8)[0] == 112  # 1.1 x 95.05
    lengths = lognormal_lengths(2000, seed=6)
    length, stats = auto_packing_length(lengths)
    assert set(stats) >= {"median", "p95", "max", "packing_length", "mean_examples_per_row", "packing_efficiency"}
    assert length % 128 == 0 and length >= max(lengths) and stats["packing_length"] == length
    with pytest.raises(ValueError):
        auto_packing_length([])


def test_packing_statistics() -> None:
    stats = packing_statistics([6, 4, 5, 5, 3], capacity=10)
    assert stats == {
        "num_examples": 5,
        "num_rows": 3,
        "capacity": 10,
        "tokens": 23,
        "mean_examples_per_row": 5 / 3,
        "packing_efficiency": 23 / 30,
        "padding_share": 1 - 23 / 30,
    }
    assert packing_statistics([], capacity=10)["num_rows"] == 0


# --- parts and units: pairs of one prompt share it (--group_by_prefix) ----------------------------------------------


@st.composite
def grouped_pairs(draw: st.DrawFn, max_pairs: int = 40) -> tuple[list[int], list[list[tuple]]]:
    """Prompt keys and parts of pairs drawn from a few prompts, each with a few responses that pairs repeat."""
    prompts = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6), label="prompt lengths")
    responses = draw(st.lists(st.integers(1, 6), min_size=2, max_size=5), label="response lengths")
    keys, sizes = [], []
    for _ in range(draw(st.integers(1, max_pairs), label="pairs")):
        prompt = draw(st.integers(0, len(prompts) - 1))
        chosen, rejected = draw(st.lists(st.integers(0, len(responses) - 1), min_size=2, max_size=2, unique=True))
        keys.append(prompt)
        parts = [(("prompt", prompt), prompts[prompt])]
        parts += [(("response", prompt, r), responses[r]) for r in (chosen, rejected)]
        sizes.append(parts)
    return keys, sizes


def test_prompt_units_keep_groups_whole_and_split_large_ones_in_dataset_order() -> None:
    keys = ["a", "b", "a", "a", "c", "a", "a", "b", "a"]
    assert prompt_units(keys, [1] * len(keys), capacity=4) == [[0, 2, 3, 5], [6, 8], [1, 7], [4]]
    # In tokens: a chunk's prompt counts once, so three pairs of one prompt fit where two lone pairs would not.
    pair = [("p", 10), ("x", 2), ("y", 2)]
    assert row_tokens([pair, [("p", 10), ("x", 2), ("z", 3)], [("p", 10), ("y", 2), ("z", 3)]]) == 17
    assert prompt_units(["p"] * 3, [pair, [("p", 10), ("x", 2), ("z", 3)], [("p", 10), ("y", 2), ("z", 3)]], 17) == [
        [0, 1, 2]
    ]
    assert prompt_units(["p"] * 3, [pair, [("p", 10), ("x", 2), ("z", 3)], [("p", 10), ("q", 4), ("z", 3)]], 17) == [
        [0, 1],
        [2],
    ]


@FAST
@given(grouped_pairs(), st.integers(24, 60))
def test_next_fit_with_parts_counts_what_a_row_does_not_hold_yet(case, capacity: int) -> None:
    _, sizes = case
    rows = next_fit(sizes, capacity)
    assert [p for row in rows for p in row] == list(range(len(sizes)))
    assert all(row_tokens([sizes[p] for p in row]) <= capacity for row in rows)
    for row, following in itertools.pairwise(rows):
        with_next = row_tokens([sizes[p] for p in [*row, following[0]]])
        assert with_next > capacity, "next-fit opens a row only when the next example does not fit"
    # Sharing only ever saves rows against the pairs laid out alone.
    assert len(rows) <= len(next_fit([row_tokens([size]) for size in sizes], capacity))


def assert_too_few_examples(error: ValueError, num_examples: int, processes: int) -> None:
    """The sampler refuses only once every unit is a single example and the processes still need more batches than
    there are examples (4 examples in 4 rows on 3 processes need 6 batches)."""
    units = r"(\d+) (?:example\(s\)|group\(s\) of pairs of one prompt)"
    found = re.fullmatch(units + r" cannot fill (\d+) batches: .*", str(error))
    assert found, error
    assert int(found[1]) == num_examples < int(found[2]) and int(found[2]) % processes == 0


def refines(units: list[list[int]], planned: list[list[int]]) -> bool:
    """Every used unit is a consecutive piece of a planned one."""
    pieces = {tuple(unit) for unit in units}
    for unit in planned:
        start = 0
        while start < len(unit):
            piece = next((p for p in pieces if p[0] == unit[start]), None)
            if piece is None or tuple(unit[start : start + len(piece)]) != piece:
                return False
            start += len(piece)
    return True


@FAST
@given(grouped_pairs(), st.integers(24, 60), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.integers(0, 9))
def test_grouped_packed_sampler_keeps_each_unit_in_one_row(case, capacity, rows_per_batch, processes, shuffle, seed):
    keys, sizes = case
    units = prompt_units(keys, sizes, capacity)
    try:
        sampler = PackedBatchSampler(sizes, capacity, rows_per_batch, processes, shuffle, seed, prompts=keys)
    except ValueError as error:
        assert_too_few_examples(error, len(sizes), processes)
        return
    assert refines(sampler.units, units)
    if len(sampler.units) > len(units):
        assert len(sampler) > len(units), "units are cut only when the processes need more batches than units"
    for epoch in (0, 1):
        batches = sampler.batch_rows(epoch)
        assert len(batches) == len(sampler) and len(sampler) % processes == 0
        rows = [row for batch in batches for row in batch]
        assert sorted(index for row in rows for index in row) == list(range(len(sizes)))
        assert all(1 <= len(batch) <= rows_per_batch for batch in batches)
        assert all(row_tokens([sizes[i] for i in row]) <= capacity for row in rows)
        row_of = {index: r for r, row in enumerate(rows) for index in row}
        for batch in batches:
            in_batch = [unit for unit in sampler.units if unit[0] in {i for row in batch for i in row}]
            if len({keys[unit[0]] for unit in in_batch}) == len(in_batch):  # no group split within this batch
                assert all(len({row_of[i] for i in unit}) == 1 for unit in in_batch), "a group spans two rows"
        again = PackedBatchSampler(sizes, capacity, rows_per_batch, processes, shuffle, seed, prompts=keys)
        assert again.batch_rows(epoch) == batches, "deterministic for a seed and epoch"


@FAST
@given(grouped_pairs(max_pairs=60), st.integers(2, 9), st.integers(1, 3), st.integers(0, 9))
def test_grouped_batches_hold_whole_groups_of_at_most_the_batch_size(case, batch_size, processes, seed) -> None:
    """Unpacked --group_by_prefix: a pair weighs 1, a "row" is a batch of up to ``batch_size`` pairs."""
    keys, _ = case
    if len(keys) < processes:
        return
    units = prompt_units(keys, [1] * len(keys), batch_size)
    sampler = PackedBatchSampler([1] * len(keys), batch_size, num_processes=processes, seed=seed, prompts=keys)
    batches = list(sampler)
    assert sorted(index for batch in batches for index in batch) == list(range(len(keys)))
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    batch_of = {index: b for b, batch in enumerate(batches) for index in batch}
    for unit in sampler.units:
        assert len({batch_of[i] for i in unit}) == 1
        # A chunk is contiguous in its batch, in dataset order: the collator sees a group's pairs together.
        batch = batches[batch_of[unit[0]]]
        start = batch.index(unit[0])
        assert batch[start : start + len(unit)] == unit
    if sampler.units == units:
        for key in set(keys):
            if keys.count(key) <= batch_size:
                assert len({batch_of[i] for i, k in enumerate(keys) if k == key}) == 1, "a group that fits is whole"


@pytest.mark.parametrize("num_processes", [2, 3])
def test_accelerate_ranks_take_disjoint_whole_groups(num_processes: int) -> None:
    keys = [index // 6 for index in range(6 * 40)]  # 40 prompts, 6 pairs each
    keys = [keys[i] for i in torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()]
    per_rank = []
    for rank in range(num_processes):
        sampler = PackedBatchSampler([1] * len(keys), 8, num_processes=num_processes, prompts=keys)
        loader = DataLoader(list(range(len(keys))), batch_sampler=sampler, collate_fn=list)
        per_rank.append(list(prepare_data_loader(loader, num_processes=num_processes, process_index=rank)))
    assert len({len(batches) for batches in per_rank}) == 1, "every rank takes the same number of steps"
    seen = [index for batches in per_rank for batch in batches for index in batch]
    assert sorted(seen) == list(range(len(keys)))
    for batches in per_rank:
        for batch in batches:
            # A group is whole, but for the two groups halved so that 40 groups make 42 batches (3 processes).
            halved = sum(keys.count(keys[i]) != sum(keys[j] == keys[i] for j in batch) for i in batch)
            assert halved in (0, 3, 6)


# --- unpacked --group_by_prefix: batches gather prompts that share a long prefix, as the collator's rows do ---------


def system_prompt_examples(seed: int = 0) -> list[dict[str, list[int]]]:
    """Pairs behind three system prompts of ``MIN_SHARED_PREFIX`` tokens, each followed by distinct questions; the
    third starts as the first but for its last token, so it shares a shorter prefix with it. Under the first, one
    question is asked by three pairs. Shuffled."""
    rng = random.Random(seed)
    first = [rng.randrange(100, 200) for _ in range(MIN_SHARED_PREFIX)]
    systems = [first, [rng.randrange(100, 200) for _ in range(MIN_SHARED_PREFIX)], [*first[:-1], 7]]
    prompts = [[*system, 1000 + 10 * s + q] for s, system in enumerate(systems) for q in range(3)]
    prompts += [[*first, 999]] * 3
    examples = [{"prompt_ids": p, "chosen_ids": [2000 + i], "rejected_ids": [3000 + i]} for i, p in enumerate(prompts)]
    rng.shuffle(examples)
    return examples


def test_unpacked_batches_gather_prompts_that_share_a_system_prompt() -> None:
    """Pairs of distinct questions behind one system prompt share a batch, and so the collator's row: the sampler and
    the collator key examples alike (``prompt_row_key``). The question that three pairs ask stays whole."""
    examples = system_prompt_examples()
    prompts = [tuple(example["prompt_ids"]) for example in examples]
    prefixes = [prompt_row_key(example["prompt_ids"]) for example in examples]
    assert len(set(prefixes)) == 3 and len(set(prompts)) == 10
    repeated = {i for i, prompt in enumerate(prompts) if prompts.count(prompt) == 3}

    def rows_per_epoch(sampler: PackedBatchSampler) -> int:
        return sum(len(prompt_rows([examples[i] for i in batch])) for batch in sampler)

    # (batch size, batches, rows): the first system prompt's 6 pairs fill two batches of 3 (its repeated question
    # one of them) or one of 6; the other two prompts' 3 pairs each fill one batch of 3, or share one of 6.
    for batch_size, num_batches, num_rows in ((3, 4, 4), (6, 2, 3)):
        sampler = PackedBatchSampler([1] * len(examples), batch_size, prompts=prompts, prefixes=prefixes, seed=1)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert sorted(i for batch in batches for i in batch) == list(range(len(examples))), "each pair once"
            assert len(batches) == num_batches and all(len(batch) <= batch_size for batch in batches)
            assert rows_per_epoch(sampler) == num_rows, "each system prompt in as few rows as its pairs need"
            assert any(repeated <= set(batch) for batch in batches), "the three pairs of one question stay whole"
        # Keyed by the whole prompt, as before, batches mix the system prompts.
        alone = PackedBatchSampler([1] * len(examples), batch_size, prompts=prompts, seed=1)
        assert rows_per_epoch(alone) > num_rows


@FAST
@given(grouped_pairs(max_pairs=60), st.integers(2, 9), st.integers(1, 3), st.integers(1, 4), st.integers(0, 9))
def test_prefix_units_hold_whole_groups_and_every_pair_once(case, batch_size, processes, systems, seed) -> None:
    """Prompts under a few shared prefixes: every pair once per epoch, batches of at most ``batch_size``, a group of
    one prompt that fits a batch whole, and the pairs of a prefix that fit a batch in one batch."""
    keys, _ = case
    if len(keys) < processes:
        return
    prefixes = [key % systems for key in keys]
    sampler = PackedBatchSampler(
        [1] * len(keys), batch_size, num_processes=processes, seed=seed, prompts=keys, prefixes=prefixes
    )
    units = prompt_units(keys, [1] * len(keys), batch_size, prefixes)
    assert all(len({prefixes[i] for i in unit}) == 1 for unit in units)
    for epoch in (0, 1):
        batches = sampler.batch_rows(epoch)
        flat = [[i for row in batch for i in row] for batch in batches]
        assert sorted(i for batch in flat for i in batch) == list(range(len(keys)))
        assert all(1 <= len(batch) <= batch_size for batch in flat)
        if sampler.units != units:
            continue  # units were halved so that every process takes a batch
        batch_of = {i: b for b, batch in enumerate(flat) for i in batch}
        for key in set(keys):
            if keys.count(key) <= batch_size:
                assert len({batch_of[i] for i, k in enumerate(keys) if k == key}) == 1, "a group that fits is whole"
        for prefix in set(prefixes):
            if prefixes.count(prefix) <= batch_size:
                assert len({batch_of[i] for i, p in enumerate(prefixes) if p == prefix}) == 1


def test_prefix_units_recombine_every_epoch() -> None:
    """Where many prompts share one prefix, the pairs that share a batch change from epoch to epoch, as with TRL's
    random sampler, while every epoch keeps the same batch count, each pair once, a prompt's pairs together and one
    prefix key per batch. Batches of 4: 16 one-pair and 4 two-pair prompts behind one system prompt, 8 one-pair
    prompts behind another; every gathered unit is full, so a batch is one unit."""
    prompts = [p for p in range(20) for _ in range(1 + (p >= 16))] + list(range(20, 28))
    prefixes = ["s" if p < 20 else "t" for p in prompts]
    sampler = PackedBatchSampler([1] * len(prompts), 4, num_processes=2, seed=3, prompts=prompts, prefixes=prefixes)
    assert len(sampler) == 8
    compositions = []
    for epoch in (0, 1):
        batches = check_epoch(sampler, epoch)
        assert all(len({prefixes[i] for i in batch}) == 1 for batch in batches), "one prefix key per batch"
        batch_of = {i: b for b, batch in enumerate(batches) for i in batch}
        for prompt in set(prompts):
            assert len({batch_of[i] for i, p in enumerate(prompts) if p == prompt}) == 1, "a prompt's pairs together"
        again = PackedBatchSampler([1] * len(prompts), 4, num_processes=2, seed=3, prompts=prompts, prefixes=prefixes)
        assert again.batch_rows(epoch) == sampler.batch_rows(epoch), "deterministic for a seed and epoch"
        compositions.append({frozenset(batch) for batch in batches})
    assert compositions[0] != compositions[1], "the pairs that share a batch change between epochs"


# --- prefix trees: a row's sequences share every common prefix (collators.layout_sizes) ------------------------------


@st.composite
def tree_examples(draw: st.DrawFn, max_examples: int = 8) -> list[dict[str, list[int]]]:
    """Pairs over a few token values, so that sequences share runs and branch often: prompts that start with one of a
    few system prompts, chosen and rejected responses that start alike, and later turns whose prompt extends an earlier
    pair's prompt and chosen response."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1), label="seed"))
    vocab = draw(st.integers(2, 5), label="token values")
    systems = [[rng.randrange(vocab) for _ in range(rng.randint(0, 8))] for _ in range(draw(st.integers(1, 3)))]
    examples: list[dict[str, list[int]]] = []
    for _ in range(draw(st.integers(1, max_examples), label="pairs")):
        if examples and rng.random() < 0.3:
            before = rng.choice(examples)
            prompt = (
                before["prompt_ids"] + before["chosen_ids"] + [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
            )
        else:
            prompt = rng.choice(systems) + [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
        head = [rng.randrange(vocab) for _ in range(rng.randint(0, 3))]
        chosen, rejected = ([*head, *(rng.randrange(vocab) for _ in range(rng.randint(1, 4)))] for _ in range(2))
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return examples


def tree_tokens(examples: list[dict[str, list[int]]]) -> int:
    """Tokens of the prefix tree of the examples' sequences: their distinct non-empty prefixes."""
    prefixes = set()
    for example in examples:
        for column in ("chosen_ids", "rejected_ids"):
            sequence = tuple(example["prompt_ids"] + example[column])
            prefixes.update(sequence[:end] for end in range(1, len(sequence) + 1))
    return len(prefixes)


@FAST
@given(tree_examples(), st.integers(0, 2**16), st.integers(0, 20))
def test_tree_sizes_count_exactly_the_prefix_tree_of_any_row(examples, seed: int, slack: int) -> None:
    sizes = layout_sizes(examples)
    rng = random.Random(seed)
    rows = [list(range(len(examples))), *([i] for i in range(len(examples)))]
    rows += [sorted(rng.sample(range(len(examples)), rng.randint(1, len(examples)))) for _ in range(4)]
    for row in rows:
        chosen = [examples[i] for i in row]
        assert row_tokens([sizes[i] for i in row]) == tree_tokens(chosen), row
        # Never more than pairs of one prompt sharing it and the responses they hold (the grouped layout).
        grouped: dict[tuple, set] = {}
        for e in chosen:
            grouped.setdefault(tuple(e["prompt_ids"]), set()).update(
                {tuple(e["chosen_ids"]), tuple(e["rejected_ids"])}
            )
        assert tree_tokens(chosen) <= sum(len(p) + sum(map(len, r)) for p, r in grouped.items())
    # Sized one at a time (a stream), the parts cut shared runs differently: they may count them more than once,
    # never less, and never more than the pairs laid out alone. Equal keys are equal parts, so a row's count does not
    # depend on the order of its examples.
    alone = [layout_sizes([example])[0] for example in examples]
    assert tree_tokens(examples) <= row_tokens(alone) <= sum(map(shared_sequence_length, examples))
    assert row_tokens(alone) == row_tokens(alone[::-1])
    # The collator's rows: a row's prefix tree fits its packing length.
    capacity = max(row_tokens([size]) for size in sizes) + slack
    collator = PrefixSharingCollator(pad_token_id=0, packing_length=capacity)
    for row in collator.layout_rows(examples):
        assert tree_tokens([examples[i] for i in row]) <= capacity


def test_best_fit_counts_what_a_row_already_holds() -> None:
    """Twelve pairs behind one 40-token system prompt: 55 tokens each alone, 15 more each beside another; rows of 100
    tokens take one pair alone but four behind one system prompt."""
    rng = random.Random(0)
    system = [rng.randrange(100, 200) for _ in range(40)]
    examples = [
        {"prompt_ids": [*system, i], "chosen_ids": [1000 + i] * 7, "rejected_ids": [2000 + i] * 7} for i in range(12)
    ]
    sizes = layout_sizes(examples)
    assert {row_tokens([size]) for size in sizes} == {55} and row_tokens(sizes[:2]) == 70
    rows = pack_rows(sizes, 100)
    assert len(rows) == 3 and all(row_tokens([sizes[i] for i in row]) == 100 for row in rows)
    assert len(pack_rows([55] * 12, 100)) == 12
    for shuffle in (False, True):
        sampler = PackedBatchSampler(sizes, 100, rows_per_batch=2, shuffle=shuffle)
        batches = sampler.batch_rows()
        assert len(batches) == 2 and all(len(row) == 4 for batch in batches for row in batch)


def test_turns_of_a_conversation_share_a_row() -> None:
    """Eight conversations of 2-6 turns, an example per turn whose prompt extends the turn before, in rows as long as
    the largest conversation's tree. Longest first, the last turns of the long conversations fill rows before the
    earlier turns that would share most with them come (7 rows); in tree order each conversation's turns come one
    after the other and join the row that holds them: 5 rows, against 10 counting each pair alone."""
    rng = random.Random(0)
    examples, conversations = [], []
    for _ in range(8):
        history = [rng.randrange(100, 200) for _ in range(rng.randint(2, 12))]
        conversations.append([])
        for _ in range(rng.randint(2, 6)):
            history += [rng.randrange(100, 200) for _ in range(rng.randint(2, 16))]
            chosen, rejected = ([rng.randrange(200, 300) for _ in range(rng.randint(2, 16))] for _ in range(2))
            conversations[-1].append(len(examples))
            examples.append({"prompt_ids": list(history), "chosen_ids": chosen, "rejected_ids": rejected})
            history += chosen
    sizes = layout_sizes(examples)
    capacity = max(row_tokens([sizes[i] for i in conversation]) for conversation in conversations)
    rows = pack_rows(sizes, capacity)
    assert len(rows) == 5 and all(row_tokens([sizes[i] for i in row]) <= capacity for row in rows)
    assert len(pack_rows([row_tokens([size]) for size in sizes], capacity)) == 10


@FAST
@given(tree_examples(max_examples=30), st.integers(0, 30), st.integers(1, 3), st.integers(1, 3), st.booleans())
def test_sampler_rows_of_prefix_trees_fit_and_hold_every_example_once(
    examples, slack, rows_per_batch, processes, shuffle
):
    sizes = layout_sizes(examples)
    capacity = max(row_tokens([size]) for size in sizes) + slack
    for window_size in (3, 4096):
        try:
            sampler = PackedBatchSampler(sizes, capacity, rows_per_batch, processes, shuffle, window_size=window_size)
        except ValueError as error:
            assert_too_few_examples(error, len(examples), processes)
            return
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = sampler.batch_rows()
            assert list(sampler) == [[i for row in batch for i in row] for batch in batches]
            assert len(batches) == len(sampler) and len(sampler) % processes == 0
            assert all(1 <= len(batch) <= rows_per_batch for batch in batches)
            rows = [row for batch in batches for row in batch]
            assert sorted(i for row in rows for i in row) == list(range(len(examples)))
            assert all(tree_tokens([examples[i] for i in row]) <= capacity for row in rows)
