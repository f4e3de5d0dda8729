"""Streamed datasets: evaluation on a streamed eval set (accelerate's batch dispatching is off, so the shared layout
arrives whole), and packing of a streamed train set with a bounded look-ahead (``packing.PackedStream``): best-fit
within windows of N examples, deterministic per seed and epoch, each example once per epoch, the same number of
steps on every process. Exactness is against trl.DPOTrainer on the same examples (float32, relative error 1e-5).
"""

import itertools
import math

import pytest
import torch
from accelerate.data_loader import IterableDatasetShard
from dpo_harness import (
    RTOL,
    assert_same_metrics,
    assert_same_step,
    conversations,
    make_trainers,
    train_step,
)
from torch.utils.data import DataLoader

from collators import shared_sequence_length
from embedded import load_tokenizer, tiny_model
from packing import PackedStream
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

PACKING_LENGTH = 384
FLOAT32_EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("packing_length", [None, PACKING_LENGTH], ids=["sharing", "sharing+packing"])
def test_streamed_eval_set_matches_trl(packing_length):
    """A map-style train set with a streamed eval set: accelerate would dispatch the eval batches (its default for a
    stream) and cut every tensor of ``shared_inputs`` to the batch size."""
    train, evaluation = conversations(4), conversations(6, seed=5)
    # Unpacked: three eval batches of two examples. Packed: all six in one batch of rows, as TRL's single batch.
    eval_batch = 2 if packing_length is None else 8
    trl_trainer, ours = make_trainers(train, packing_length=packing_length, per_device_eval_batch_size=eval_batch)
    assert ours.accelerator.dispatch_batches is False
    trl_metrics = trl_trainer.evaluate(eval_dataset=evaluation.to_iterable_dataset())
    ours_metrics = ours.evaluate(eval_dataset=evaluation.to_iterable_dataset())
    assert ours_metrics["eval_tokens/saved_share"] > 0  # the shared layout ran
    assert "eval_loss" in trl_metrics
    assert_same_metrics(ours_metrics, trl_metrics)


def test_dispatching_is_turned_off_with_a_warning_when_asked_for(tmp_path):
    args = PrefixDPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        bf16=False,
        prefix_sharing=True,
        accelerator_config={"dispatch_batches": True},
    )
    with pytest.warns(UserWarning, match="dispatch_batches=True is turned off"):
        ours = PrefixDPOTrainer(
            model=tiny_model(),
            ref_model=tiny_model(),
            args=args,
            train_dataset=conversations(2),
            processing_class=load_tokenizer(),
        )
    assert ours.accelerator.dispatch_batches is False


# ---------------------------------------------------------------------------------------------------------------------
# PackedStream
# ---------------------------------------------------------------------------------------------------------------------


def lengths_stream(lengths: list[int]) -> list[dict[str, int]]:
    return [{"index": i, "length": n} for i, n in enumerate(lengths)]


def random_lengths(count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 100, (count,), generator=generator).tolist()


def packed_stream(examples, **kwargs) -> PackedStream:
    return PackedStream(examples, lambda example: example["length"], capacity=128, **kwargs)


@pytest.mark.parametrize(
    "count, num_processes, rows_per_batch",
    [(1, 1, 1), (37, 1, 1), (5, 4, 2), (37, 2, 3), (250, 2, 3), (250, 4, 2)],
)
def test_each_example_once_and_the_same_steps_on_every_process(count, num_processes, rows_per_batch):
    lengths = random_lengths(count)
    stream = packed_stream(
        lengths_stream(lengths), rows_per_batch=rows_per_batch, num_processes=num_processes, window_size=32
    )
    stream.set_epoch(3)
    # accelerate deals a stream's items out per process (one item per step and process, no repeats needed).
    per_process = [
        list(IterableDatasetShard(stream, batch_size=1, num_processes=num_processes, process_index=rank))
        for rank in range(num_processes)
    ]
    assert len({len(batches) for batches in per_process}) == 1
    seen = sorted(example["index"] for batches in per_process for batch in batches for example in batch)
    assert seen == list(range(count))
    for batches in per_process:
        for batch in batches:
            assert 1 <= len(batch)
            assert sum(example["length"] for example in batch) <= 128 * rows_per_batch


def test_deterministic_per_seed_and_epoch():
    examples = lengths_stream(random_lengths(200))

    def order(seed: int, epoch: int) -> list[list[int]]:
        stream = packed_stream(examples, seed=seed, window_size=40)
        stream.set_epoch(epoch)
        return [[example["index"] for example in batch] for batch in stream]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_look_ahead_is_bounded_and_rows_are_best_fit_within_windows():
    lengths = random_lengths(300, seed=1)
    read = 0

    def counting():
        nonlocal read
        for example in lengths_stream(lengths):
            read += 1
            yield example

    window = 50
    yielded = 0
    for batch in packed_stream(counting(), window_size=window):
        assert read - yielded <= 2 * window
        yielded += len(batch)
    assert yielded == len(lengths)
    # Windows cost a few part-filled rows, not many: within 10% of packing every example at once.
    rows = sum(1 for _ in packed_stream(lengths_stream(lengths), window_size=window))
    assert rows <= math.ceil(1.1 * math.ceil(sum(lengths) / 128)) + len(lengths) // window


def test_a_too_long_example_and_a_too_short_stream_are_clear_errors():
    with pytest.raises(ValueError, match=r"Example 2 of the train dataset \(in stream order\) takes 500 tokens"):
        list(packed_stream(lengths_stream([10, 20, 500, 30]), name="train"))
    with pytest.raises(ValueError, match="2 example\\(s\\) cannot fill 4 batches"):
        list(packed_stream(lengths_stream([10, 20]), num_processes=4))


# ---------------------------------------------------------------------------------------------------------------------
# Training on a streamed, packed train set
# ---------------------------------------------------------------------------------------------------------------------


def test_streamed_packed_training_matches_trl_batch_by_batch():
    """The trainer's loader yields PackedStream's batches (two windows of three examples); each batch trains as
    trl.DPOTrainer trains the same examples, and together they hold every example once."""
    dataset = conversations(6)
    _, ours = make_trainers(
        dataset.to_iterable_dataset(),
        packing_length=PACKING_LENGTH,
        per_device_train_batch_size=1,
        packing_window=3,
        max_steps=20,
    )
    trl_trainer, _ = make_trainers(dataset, per_device_train_batch_size=1)
    stream = PackedStream(
        ours.train_dataset, shared_sequence_length, PACKING_LENGTH, window_size=3, seed=ours.args.seed
    )
    loader = ours.get_train_dataloader()
    batches = list(stream)
    assert len(batches) < len(dataset)  # rows hold several examples
    seen = sorted(tuple(example["prompt_ids"] + example["chosen_ids"]) for batch in batches for example in batch)
    assert seen == sorted(tuple(e["prompt_ids"] + e["chosen_ids"]) for e in trl_trainer.train_dataset)
    for examples, loaded in itertools.zip_longest(batches, loader):
        assert torch.equal(loaded["input_ids"], ours.data_collator(examples)["input_ids"])
        assert_same_step(train_step(ours, examples=examples), train_step(trl_trainer, examples=examples))


def test_streamed_packed_training_matches_trl(tmp_path):
    """``Trainer.train`` on a streamed, packed train set: every step logs the loss, gradient norm and metrics that
    trl.DPOTrainer's ``train`` logs on the same examples, and the weights move as TRL's do. TRL cannot pack, so its
    loader gives it, step by step, the examples of our packed rows. Plain SGD: the weight update is then the
    gradient itself (Adam's first steps are about the gradient's sign, which rounding flips on near-zero entries)."""
    steps = 2
    config = dict(
        per_device_train_batch_size=1, max_steps=steps, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", tmp_path=tmp_path,
    )  # fmt: skip
    dataset = conversations(6)
    _, ours = make_trainers(dataset.to_iterable_dataset(), packing_length=PACKING_LENGTH, packing_window=3, **config)
    trl_trainer, _ = make_trainers(dataset, **config)
    stream = PackedStream(
        ours.train_dataset, shared_sequence_length, PACKING_LENGTH, window_size=3, seed=ours.args.seed
    )
    batches = list(itertools.islice(stream, steps))
    assert all(len(examples) > 1 for examples in batches), "each step packs several examples"
    loader = DataLoader(batches, batch_size=None, collate_fn=trl_trainer.data_collator)  # one item: one step
    trl_trainer.get_train_dataloader = lambda: loader
    initial = {name: parameter.detach().clone() for name, parameter in trl_trainer.model.named_parameters()}
    ours.train()
    trl_trainer.train()
    assert ours.examples_trained == sum(len(examples) for examples in batches)
    ours_logs, trl_logs = ours.state.log_history, trl_trainer.state.log_history
    assert [log["step"] for log in trl_logs] == [1, 2, 2] and "loss" in trl_logs[0]
    for ours_log, trl_log in zip(ours_logs, trl_logs, strict=True):
        assert_same_metrics(ours_log, trl_log)
    trl_weights = {name: parameter.detach() for name, parameter in trl_trainer.model.named_parameters()}
    for name, parameter in ours.model.named_parameters():
        # The updates agree to RTOL, up to the float32 rounding of the weights they were added to.
        bound = RTOL * (trl_weights[name] - initial[name]).norm() + FLOAT32_EPS * trl_weights[name].norm()
        assert (parameter.detach() - trl_weights[name]).norm() <= bound, name


def test_auto_packing_length_on_a_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="--packing_length auto .* streamed dataset"):
        make_trainers(
            conversations(2).to_iterable_dataset(), packing_length="auto", per_device_train_batch_size=1, max_steps=1
        )
