"""Training throughput of standard DPO, prefix sharing, packing and both, on synthetic data shaped like the paper's.

    python benchmark/throughput.py                       # all six shapes, 4 configurations, median of 3 repeats
    python benchmark/throughput.py --shapes capybara tldr --repeats 1 --configs baseline sharing   # a quick look
    python benchmark/throughput.py --profile capybara    # where the time goes, per configuration (torch.profiler)
    python benchmark/throughput.py --calibrate-only --recalibrate   # redo the length calibration

Every configuration is a ``PrefixDPOTrainer`` running real optimizer steps through ``trainer.train()`` on the same
examples, from the same initial weights, in one process: the baseline is prefix_sharing=False (TRL's own path). Each
repeat times one epoch over the examples per configuration, configurations interleaved, after untimed warm-up steps.
Speedups are medians of per-repeat ratios (runs of one repeat are adjacent in time, so slow load drift cancels).

The shapes follow Table 1 of the paper: the median overall length and the median prefix-to-completion ratio of each
dataset. Read here as: overall = prompt + chosen + rejected tokens, ratio = prompt / mean(chosen, rejected) tokens,
both per example, tokenized as the trainer tokenizes (chat template, EOS). Lengths are drawn log-uniformly around a
center with a per-dataset spread (long-tailed, like real chat data), and the centers are calibrated on the embedded
tokenizer until the medians match (``--calibrate-only`` shows them). The timed examples are the subset of a
400-example pool closest to the pool in median length, median ratio, token bound and length deciles, so that a
handful of examples still follows the shape's distribution.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from prefix_dpo_trainer import PrefixDPOTrainer


# ---------------------------------------------------------------------------------------------------------------------
# Dataset shapes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A dataset's length profile from the paper, plus the spreads and turn counts we assume to draw its examples.

    ``prompt_spread``/``response_spread`` are the max/min ratios of the log-uniform word-count draws (the paper gives
    medians only; the spreads are our reading of each dataset: multi-turn chat has long tails, TL;DR posts and
    summaries are narrow). ``word_centers`` are the prompt and response word-count medians found by :func:`calibrate`
    (``--recalibrate`` redoes it) for the embedded tokenizer.
    """

    key: str
    name: str
    median_length: int
    median_ratio: float
    turns: tuple[int, int]
    prompt_spread: float
    response_spread: float
    word_centers: tuple[float, float]

    @property
    def paper(self) -> dict[str, tuple[float, float]]:
        return PAPER_SPEEDUPS[self.key]

    @property
    def target_prompt(self) -> float:
        # overall = P + 2c and ratio = P / c give P = overall * ratio / (ratio + 2).
        return self.median_length * self.median_ratio / (self.median_ratio + 2)

    @property
    def target_completion(self) -> float:
        return self.median_length / (self.median_ratio + 2)

    @property
    def median_bound(self) -> float:
        """Token-count bound of a median example: (2P + 2c) / (P + 2c)."""
        return (2 * self.median_ratio + 2) / (self.median_ratio + 2)


# key, name, median overall length, median ratio (paper's Table 1), turns, prompt spread, response spread, centers.
SHAPES: dict[str, Shape] = {
    shape.key: shape
    for shape in (
        Shape("capybara", "Capybara", 1160, 1.59, (1, 4), 12, 8, (412, 223)),
        Shape("hh-rlhf", "HH-RLHF", 186, 2.15, (1, 3), 8, 10, (72, 30)),
        Shape("metamath", "MetaMath-DPO", 872, 3.91, (1, 1), 3, 4, (493, 115)),
        Shape("tldr", "TLDR", 416, 11.14, (1, 1), 3, 2.5, (303, 23)),
        Shape("tulu", "Tulu-Helpsteer", 775, 6.34, (1, 2), 8, 6, (510, 72)),
        Shape("ultrafeedback", "UltraFeedback", 409, 0.42, (1, 1), 8, 5, (56, 126)),
    )
}
# The paper's speedups of Flex + prefix sharing over FlashAttention-3 and over FlexAttention (8xH100, Mistral-7B):
# unpacked, and packed (prefix sharing + packing over packing).
PAPER_SPEEDUPS: dict[str, dict[str, tuple[float, float]]] = {
    "capybara": {"unpacked": (1.42, 1.54), "packed": (1.34, 1.36)},
    "hh-rlhf": {"unpacked": (1.07, 1.19), "packed": (1.41, 1.48)},
    "metamath": {"unpacked": (1.38, 1.47), "packed": (1.57, 1.60)},
    "tldr": {"unpacked": (1.12, 1.20), "packed": (1.35, 1.38)},
    "tulu": {"unpacked": (1.47, 1.56), "packed": (1.48, 1.52)},
    "ultrafeedback": {"unpacked": (1.11, 1.18), "packed": (1.17, 1.21)},
}


@dataclass
class Lengths:
    """Per-example token counts: shared prompt, chosen completion, rejected completion."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def overall(self) -> list[int]:
        return [p + c + r for p, c, r in zip(self.prompt, self.chosen, self.rejected, strict=True)]

    @property
    def ratios(self) -> list[float]:
        return [2 * p / max(c + r, 1) for p, c, r in zip(self.prompt, self.chosen, self.rejected, strict=True)]

    @property
    def standard_tokens(self) -> int:
        """Non-padding tokens standard DPO runs: the prompt twice."""
        return sum(2 * p + c + r for p, c, r in zip(self.prompt, self.chosen, self.rejected, strict=True))

    @property
    def shared_tokens(self) -> int:
        return sum(self.overall)

    @property
    def bound(self) -> float:
        """Upper bound of the prefix-sharing speedup if cost were linear in non-padding tokens."""
        return self.standard_tokens / self.shared_tokens

    def layout_lengths(self, share_prompt: bool) -> list[int]:
        columns = zip(self.prompt, self.chosen, self.rejected, strict=True)
        return [p + c + r + (0 if share_prompt else p) for p, c, r in columns]

    def subset(self, indices: Sequence[int]) -> Lengths:
        return Lengths(*([column[i] for i in indices] for column in (self.prompt, self.chosen, self.rejected)))

    def summary(self) -> dict[str, float]:
        overall = sorted(self.overall)
        return {
            "examples": len(self),
            "median_length": statistics.median(overall),
            "p10_length": _quantile(overall, 0.1),
            "p90_length": _quantile(overall, 0.9),
            "max_length": overall[-1],
            "median_ratio": statistics.median(self.ratios),
            "median_prompt": statistics.median(self.prompt),
            "median_completion": statistics.median(
                [(c + r) / 2 for c, r in zip(self.chosen, self.rejected, strict=True)]
            ),
            "bound": self.bound,
        }


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def word_bounds(center: float, spread: float) -> tuple[int, int]:
    """Log-uniform bounds with the given max/min ratio whose geometric mean (the median of the draw) is ``center``."""
    low = max(1, round(center / math.sqrt(spread)))
    return low, max(low, round(center * math.sqrt(spread)))


def generate(shape: Shape, centers: tuple[float, float], num_examples: int, seed: int) -> Dataset:
    """Capybara-schema conversations with the shape's turns and length draws (prefix-stable in ``num_examples``)."""
    from embedded import make_preference_dataset

    return make_preference_dataset(
        num_examples,
        seed=seed,
        prompt_words=word_bounds(centers[0], shape.prompt_spread),
        response_words=word_bounds(centers[1], shape.response_spread),
        turns=shape.turns,
        short_response_prob=0.0,
    )


def measure(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Lengths:
    """Token counts split as TRL splits a conversational example (mirrored by ``embedded.trl_token_lengths``)."""
    from embedded import trl_token_lengths

    columns = [trl_token_lengths(tokenizer, example) for example in dataset]
    return Lengths(*(list(column) for column in zip(*columns, strict=True)))


def calibrate(
    shape: Shape, tokenizer: PreTrainedTokenizerBase, pool_size: int, seed: int, iterations: int = 1
) -> tuple[tuple[float, float], Dataset, Lengths]:
    """Word-count centers whose examples hit the shape's median length and ratio (within ~2%), and the pool drawn.

    Starts from the shape's stored centers; ``iterations=1`` only draws the pool. A multiplicative fixed point: the
    overall error scales both centers, the ratio error moves them apart (a word is about 1.2 tokens with the embedded
    tokenizer, plus a few tokens of chat markup per turn, which is why it takes a few rounds). The best round wins.
    """
    centers = shape.word_centers
    best: tuple[float, tuple[float, float], Dataset, Lengths] | None = None
    for _ in range(iterations):
        dataset = generate(shape, centers, pool_size, seed)
        lengths = measure(dataset, tokenizer)
        summary = lengths.summary()
        length_error = shape.median_length / summary["median_length"]
        ratio_error = shape.median_ratio / summary["median_ratio"]
        error = abs(math.log(length_error)) + abs(math.log(ratio_error))
        if best is None or error < best[0]:
            best = (error, centers, dataset, lengths)
        if error < 0.01:
            break
        centers = (
            centers[0] * length_error * math.sqrt(ratio_error),
            centers[1] * length_error / math.sqrt(ratio_error),
        )
    assert best is not None
    return best[1], best[2], best[3]


def representative_subset(lengths: Lengths, num_examples: int, seed: int, candidates: int = 4000) -> list[int]:
    """Indices of ``num_examples`` pool examples whose length distribution, median ratio and bound match the pool's.

    A few dozen examples drawn at random can miss the pool's median ratio by 30%; out of ``candidates`` random subsets
    this keeps the one closest to the pool in median length, median ratio, token bound and the overall-length
    deciles (all compared in log space), so that the timed examples are the shape in small.
    """
    import random

    if num_examples >= len(lengths):
        return list(range(len(lengths)))
    pool = lengths.summary()
    pool_overall = sorted(lengths.overall)
    deciles = [_quantile(pool_overall, q / 10) for q in range(1, 10)]
    rng = random.Random(seed)
    best: tuple[float, list[int]] | None = None
    for _ in range(candidates):
        indices = sorted(rng.sample(range(len(lengths)), num_examples))
        subset = lengths.subset(indices)
        summary = subset.summary()
        overall = sorted(subset.overall)
        distance = (
            abs(math.log(summary["median_length"] / pool["median_length"]))
            + abs(math.log(summary["median_ratio"] / pool["median_ratio"]))
            + abs(math.log(summary["bound"] / pool["bound"]))
            + sum(abs(math.log(_quantile(overall, q / 10) / d)) for q, d in enumerate(deciles, 1)) / len(deciles)
        )
        if best is None or distance < best[0]:
            best = (distance, indices)
    assert best is not None
    return best[1]


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------

# Tiny Llama-style sizes. "small" is the default: the six-shape sweep fits in about 10 minutes on 2 CPU cores, and
# the body (projections + attention) costs about 3x the LM head per padded position (see `cost_model`, and the
# profile: on Capybara-shaped batches the baseline spends ~26% of its time in the head, the rest in the body).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 512, "heads": 2, "kv_heads": 1},
    "small": {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 1024, "heads": 4, "kv_heads": 2},
    "base": {"hidden_size": 512, "num_hidden_layers": 2, "intermediate_size": 2048, "heads": 8, "kv_heads": 4},
    "medium": {"hidden_size": 768, "num_hidden_layers": 4, "intermediate_size": 3072, "heads": 12, "kv_heads": 4},
    "large": {"hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 4096, "heads": 16, "kv_heads": 8},
}


def model_dims(args: argparse.Namespace) -> dict[str, int]:
    dims = dict(MODEL_SIZES[args.model_size])
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "heads", "kv_heads"):
        if getattr(args, name, None) is not None:
            dims[name] = getattr(args, name)
    if dims["hidden_size"] % dims["heads"] or dims["heads"] % dims["kv_heads"]:
        raise SystemExit(f"hidden size, heads and kv heads must divide: {dims}")
    return dims


def build_model(dims: dict[str, int], attn_implementation: str, seed: int) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    from embedded import tiny_model_config

    config = tiny_model_config(
        "llama",
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        intermediate_size=dims["intermediate_size"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["hidden_size"] // dims["heads"],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)


def cost_model(dims: dict[str, int], vocab_size: int) -> dict[str, float]:
    """Multiply-adds per token of one forward: the layers' projections and the LM head, and attention per key."""
    hidden, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = hidden // dims["heads"] * dims["kv_heads"]
    projections = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    return {
        "body_per_token": projections,
        "attention_per_token_per_key": 2 * hidden * layers,  # QK^T and AV; sdpa with a dense mask visits every key
        "head_per_scored_token": hidden * vocab_size,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Trainers and timing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    key: str
    label: str
    prefix_sharing: bool
    packing: bool


CONFIGS: dict[str, RunConfig] = {
    config.key: config
    for config in (
        RunConfig("baseline", "baseline (TRL path)", False, False),
        RunConfig("sharing", "prefix sharing", True, False),
        RunConfig("packing", "packing", False, True),
        RunConfig("sharing+packing", "prefix sharing + packing", True, True),
    )
}


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall clock from the start of the epoch (before the first batch is collated) to the end of each step."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]
            self.cpu_marks = [time.process_time()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    return StepTimer()


def make_trainer(
    config: RunConfig,
    dataset: Dataset,
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    packing_length: int | None,
    output_dir: Path,
) -> PrefixDPOTrainer:
    from transformers.trainer_callback import PrinterCallback

    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    packing = {"enable_packing": True, "packing_length": str(packing_length)} if config.packing else {}
    training_args = PrefixDPOConfig(
        output_dir=str(output_dir / config.key),
        prefix_sharing=config.prefix_sharing,
        per_device_train_batch_size=args.packing_rows if config.packing else args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-6,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=args.seed,
        **packing,
    )
    timer = _step_timer()
    trainer = PrefixDPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.step_timer = timer
    # The printer echoes every train() call's metrics dict; the benchmark prints its own lines.
    trainer.remove_callback(PrinterCallback)
    return trainer


@dataclass
class Work:
    """What one epoch's forwards process, counted from the collated batches (cheap: collation only).

    ``positions``: rows x padded length (what the layers' projections run over); ``attention_pairs``: rows x length^2
    (sdpa with a dense mask visits every query-key pair, padding included); ``head_positions``: positions scored by
    TRL's fused LM head, which off Triton devices projects every position of the standard layout, padding included,
    while the shared forward hands it only the completion tokens.
    """

    positions: int = 0
    attention_pairs: int = 0
    head_positions: int = 0
    tokens: int = 0

    def cost(self, costs: dict[str, float]) -> float:
        """Multiply-adds of one forward over the epoch under :func:`cost_model`."""
        return (
            self.positions * costs["body_per_token"]
            + self.attention_pairs * costs["attention_per_token_per_key"]
            + self.head_positions * costs["head_per_scored_token"]
        )


def count_work(trainer: PrefixDPOTrainer) -> Work:
    import torch

    work = Work()
    triton = torch.cuda.is_available()  # TRL's fused head scores only valid positions on Triton devices
    torch.manual_seed(trainer.args.seed)  # the batches `run_epoch` will time
    for batch in trainer.get_train_dataloader():
        shared = batch.get("shared_inputs")
        if shared is None:
            rows, length = batch["input_ids"].shape
            scored = int(batch["completion_mask"][:, 1:].sum()) if triton else rows * (length - 1)
            tokens = int(batch["attention_mask"].sum())
        else:
            rows, length = shared["input_ids"].shape
            scored = shared["score_index"].numel()
            tokens = int((shared["sequence_ids"] >= 0).sum())
        work.positions += rows * length
        work.attention_pairs += rows * length * length
        work.head_positions += scored
        work.tokens += tokens
    return work


@dataclass
class EpochResult:
    seconds: float
    cpu_seconds: float
    steps: int
    step_seconds: list[float]
    tokens_computed: int
    tokens_standard: int


def run_epoch(trainer: PrefixDPOTrainer, max_steps: int = -1) -> EpochResult:
    """One ``trainer.train()`` call: an epoch over the dataset (or ``max_steps`` steps), with a fresh optimizer."""
    import torch

    computed, standard = trainer.tokens_computed, trainer.tokens_standard
    trainer.args.max_steps = max_steps
    # Trainer's RandomSampler draws from the global generator: reseeding gives every epoch of every unpacked
    # configuration the same batches, so baseline and prefix sharing pad the same groups of examples.
    torch.manual_seed(trainer.args.seed)
    gc.collect()
    gc.disable()  # a collection in the middle of one configuration's epoch would be charged to it alone
    try:
        trainer.train()
    finally:
        gc.enable()
    marks = trainer.step_timer.marks
    steps = [end - start for start, end in zip(marks, marks[1:], strict=False)]
    return EpochResult(
        seconds=marks[-1] - marks[0],
        cpu_seconds=trainer.step_timer.cpu_marks[-1] - trainer.step_timer.cpu_marks[0],
        steps=len(steps),
        step_seconds=steps,
        tokens_computed=trainer.tokens_computed - computed,
        tokens_standard=trainer.tokens_standard - standard,
    )


def tokenized_lengths(trainer: PrefixDPOTrainer) -> Lengths:
    data = trainer.train_dataset
    return Lengths(
        [len(x) for x in data["prompt_ids"]],
        [len(x) for x in data["chosen_ids"]],
        [len(x) for x in data["rejected_ids"]],
    )


def choose_packing_length(lengths: Lengths, args: argparse.Namespace) -> int:
    """One packing length for both packing configurations, so that they differ only in prefix sharing.

    ``auto`` is the paper's rule (``packing.auto_packing_length``) on the prefix-shared lengths, as the trainer's
    ``--packing_length auto`` computes it; it is raised to the longest unshared example so that every example fits
    a row in both layouts.
    """
    from packing import auto_packing_length

    longest = max(lengths.layout_lengths(share_prompt=False))
    if args.packing_length == "auto":
        length, _ = auto_packing_length(
            lengths.layout_lengths(share_prompt=True), examples_per_row=args.packing_factor
        )
    else:
        length = int(args.packing_length)
    return max(length, -(-longest // 128) * 128)


def examples_for(lengths: Lengths, args: argparse.Namespace) -> int:
    """Enough examples for about ``--tokens-per-shape`` standard-DPO tokens, in whole batches, at least two batches."""
    mean_standard = lengths.standard_tokens / len(lengths)
    wanted = max(2 * args.batch_size, round(args.tokens_per_shape / mean_standard))
    if args.examples is not None:
        wanted = args.examples
    if args.steps is not None:
        wanted = args.steps * args.batch_size
    return min(len(lengths), math.ceil(wanted / args.batch_size) * args.batch_size)


def benchmark_shape(
    shape: Shape,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    output_dir: Path,
    log,
    warmup_steps: int,
) -> dict[str, Any]:
    from packing import packing_statistics

    started = time.perf_counter()
    centers, pool, pool_lengths = calibrate(shape, tokenizer, args.pool_size, args.seed, args.calibration_rounds)
    picked = representative_subset(pool_lengths, examples_for(pool_lengths, args), args.seed)
    dataset = pool.select(picked)
    dims = model_dims(args)
    policy = build_model(dims, args.attn_implementation, args.seed)
    reference = build_model(dims, args.attn_implementation, args.seed + 1)

    configs = [CONFIGS[key] for key in args.configs]
    trainers: dict[str, PrefixDPOTrainer] = {}
    lengths: Lengths | None = None
    packing_stats: dict[str, dict[str, Any]] = {}
    # Unpacked trainers first: their tokenized dataset gives the layout lengths the packing length is chosen from.
    for config in sorted(configs, key=lambda c: c.packing):
        packing_length = None
        if config.packing:
            assert lengths is not None, "the baseline (unpacked) trainer comes first"
            packing_length = choose_packing_length(lengths, args)
            layout = lengths.layout_lengths(config.prefix_sharing)
            stats = packing_statistics(layout, packing_length)
            packing_stats[config.key] = {
                "packing_length": packing_length,
                "examples_per_row": stats["mean_examples_per_row"],
                "efficiency": stats["packing_efficiency"],
            }
        trainer = make_trainer(config, dataset, policy, reference, tokenizer, args, packing_length, output_dir)
        trainers[config.key] = trainer
        if lengths is None:
            lengths = tokenized_lengths(trainer)
    assert lengths is not None
    summary = lengths.summary()
    pool_summary = pool_lengths.summary()
    log(
        f"\n== {shape.name}: {len(lengths)} examples, median length {summary['median_length']:.0f} "
        f"(target {shape.median_length}), median ratio {summary['median_ratio']:.2f} (target {shape.median_ratio}), "
        f"token bound {lengths.bound:.3f}; pool of {len(pool_lengths)} (word centers {centers[0]:.0f}, "
        f"{centers[1]:.0f}): median length {pool_summary['median_length']:.0f}, "
        f"ratio {pool_summary['median_ratio']:.2f}"
    )
    for key, stats in packing_stats.items():
        log(
            f"   {key}: packing length {stats['packing_length']}, {stats['examples_per_row']:.2f} examples/row, "
            f"{stats['efficiency']:.1%} non-padding"
        )

    work = {key: count_work(trainer) for key, trainer in trainers.items()}
    if warmup_steps:
        for trainer in trainers.values():
            run_epoch(trainer, max_steps=warmup_steps)

    runs: dict[str, list[EpochResult]] = {key: [] for key in trainers}
    for repeat in range(args.repeats):
        # Interleaved, and in a rotated order each repeat, so that drift in machine load spreads over all configs.
        order = list(trainers)
        order = order[repeat % len(order) :] + order[: repeat % len(order)]
        for key in order:
            result = run_epoch(trainers[key])
            runs[key].append(result)
            log(
                f"   repeat {repeat + 1} {key:16s} {result.seconds:7.2f} s  {result.steps} steps  "
                f"{len(lengths) / result.seconds:7.2f} samples/s"
            )
    for trainer in trainers.values():
        trainer.accelerator.free_memory()
    del trainers
    gc.collect()

    return {
        "shape": {**asdict(shape), "paper": shape.paper},
        "word_centers": centers,
        "examples": summary,
        "pool": pool_lengths.summary(),
        "packing": packing_stats,
        "work": {key: asdict(counts) for key, counts in work.items()},
        "runs": {
            key: [
                {
                    "seconds": r.seconds,
                    "cpu_seconds": r.cpu_seconds,
                    "steps": r.steps,
                    "step_seconds": r.step_seconds,
                    "tokens_computed": r.tokens_computed,
                    "tokens_standard": r.tokens_standard,
                }
                for r in results
            ]
            for key, results in runs.items()
        },
        "wall_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


CRITERION_SHAPES = ("capybara", "metamath", "tulu")  # must reach 90% of the token bound; every shape: not slower


def speedups(result: dict[str, Any], key: str, over: str, clock: str = "seconds") -> list[float]:
    """Per-repeat ratios: each repeat's runs are adjacent in time, so the ratio cancels slow drift in machine load.

    ``clock`` is ``seconds`` (wall clock: throughput) or ``cpu_seconds`` (the process's CPU time: with one torch thread
    and no dataloader workers, time the process actually ran, which another process taking the core does not inflate).
    """
    runs = result["runs"]
    return [b[clock] / a[clock] for a, b in zip(runs[key], runs[over], strict=True)]


def fmt_range(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def criterion(result: dict[str, Any]) -> str:
    """The done criterion on the median wall-clock speedup: 90% of the bound (three shapes), never slower (all)."""
    speedup = statistics.median(speedups(result, "sharing", "baseline"))
    checks = [f"not slower: {'yes' if speedup >= 1.0 else 'NO'}"]
    if result["shape"]["key"] in CRITERION_SHAPES:
        share = speedup / result["examples"]["bound"]
        checks.insert(0, f">= 90% of bound: {'yes' if share >= 0.9 else 'NO'}")
    return ", ".join(checks)


def bound_table(results: list[dict[str, Any]]) -> str:
    """Prefix sharing over the baseline against the token-count bound and the paper, with the done criterion."""
    lines = [
        "| shape | examples | median length / ratio: here (paper) | token bound | speedup, wall clock: median "
        "(min-max) | % of bound | speedup, CPU time | % of bound | paper: over FA3 / over Flex | done criterion |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | ---: | --- | --- |",
    ]
    for result in results:
        shape, examples = result["shape"], result["examples"]
        bound = examples["bound"]
        wall = speedups(result, "sharing", "baseline")
        cpu = speedups(result, "sharing", "baseline", "cpu_seconds")
        lines.append(
            f"| {shape['name']} | {examples['examples']} | {examples['median_length']:.0f} / "
            f"{examples['median_ratio']:.2f} ({shape['median_length']} / {shape['median_ratio']}) | {bound:.2f} "
            f"| {fmt_range(wall)} | {statistics.median(wall) / bound:.0%} | {fmt_range(cpu)} "
            f"| {statistics.median(cpu) / bound:.0%} | {shape['paper']['unpacked'][0]:.2f} / "
            f"{shape['paper']['unpacked'][1]:.2f} | {criterion(result)} |"
        )
    return "\n".join(lines)


def packed_table(results: list[dict[str, Any]]) -> str:
    """Prefix sharing + packing over packing alone (the paper's packed comparison), same rows, same examples."""
    lines = [
        "| shape | packing length | examples per row: packing / sharing + packing | token bound "
        "| speedup, wall clock: median (min-max) | % of bound | speedup, CPU time | paper: over FA3 / over Flex |",
        "| --- | ---: | --- | ---: | --- | ---: | --- | --- |",
    ]
    for result in results:
        if not {"packing", "sharing+packing"} <= result["runs"].keys():
            continue
        shape, packing = result["shape"], result["packing"]
        bound = result["examples"]["bound"]
        wall = speedups(result, "sharing+packing", "packing")
        cpu = speedups(result, "sharing+packing", "packing", "cpu_seconds")
        lines.append(
            f"| {shape['name']} | {packing['packing']['packing_length']} "
            f"| {packing['packing']['examples_per_row']:.2f} / {packing['sharing+packing']['examples_per_row']:.2f} "
            f"| {bound:.2f} | {fmt_range(wall)} | {statistics.median(wall) / bound:.0%} | {fmt_range(cpu)} "
            f"| {shape['paper']['packed'][0]:.2f} / {shape['paper']['packed'][1]:.2f} |"
        )
    return "\n".join(lines)


def throughput_table(results: list[dict[str, Any]]) -> str:
    """Samples/s and tokens/s per configuration (wall-clock medians over repeats) and speedups over the baseline."""
    lines = [
        "| shape | configuration | s / epoch: median (min-max) | samples/s | tokens/s | speedup vs baseline, wall "
        "clock | speedup vs baseline, CPU time |",
        "| --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for result in results:
        examples = result["examples"]["examples"]
        for index, (key, runs) in enumerate(result["runs"].items()):
            seconds = [r["seconds"] for r in runs]
            middle = statistics.median(seconds)
            lines.append(
                f"| {result['shape']['name'] if index == 0 else ''} | {CONFIGS[key].label} | {fmt_range(seconds)} "
                f"| {examples / middle:.2f} | {runs[0]['tokens_standard'] / middle:,.0f} "
                f"| {fmt_range(speedups(result, key, 'baseline'))} "
                f"| {fmt_range(speedups(result, key, 'baseline', 'cpu_seconds'))} |"
            )
    return "\n".join(lines)


def work_table(results: list[dict[str, Any]], costs: dict[str, float]) -> str:
    """What each configuration's forwards process, counted from its batches, and the speedup that implies."""
    lines = [
        "| shape | configuration | non-padding tokens | padded positions | LM-head positions | attention pairs (M) "
        "| cost-model speedup vs baseline | measured (CPU time) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        work = {key: Work(**counts) for key, counts in result["work"].items()}
        base = work["baseline"].cost(costs)
        for index, (key, counts) in enumerate(work.items()):
            measured = statistics.median(speedups(result, key, "baseline", "cpu_seconds"))
            lines.append(
                f"| {result['shape']['name'] if index == 0 else ''} | {CONFIGS[key].label} | {counts.tokens:,} "
                f"| {counts.positions:,} | {counts.head_positions:,} | {counts.attention_pairs / 1e6:,.1f} "
                f"| {base / counts.cost(costs):.2f} | {measured:.2f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Measured speedup per shape beside the paper's two speedups and the token-count bound, unpacked and packed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("unpacked", "sharing", "baseline", "without packing: prefix sharing / baseline (TRL path)")]
    if all("sharing+packing" in r["runs"] and "packing" in r["runs"] for r in results):
        panels.append(("packed", "sharing+packing", "packing", "with packing: prefix sharing + packing / packing"))
    names = [r["shape"]["name"] for r in results]
    bounds = [r["examples"]["bound"] for r in results]
    # Scaled to the medians, not the error bars: one repeat stalled by another job must not flatten every bar.
    top = max(
        [*bounds]
        + [
            statistics.median(speedups(r, key, over, clock))
            for r in results
            for _, key, over, _ in panels
            for clock in ("seconds", "cpu_seconds")
        ]
        + [max(r["shape"]["paper"][paper]) for r in results for paper, *_ in panels]
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 5.0), squeeze=False)
    width = 0.26
    positions = list(range(len(results)))
    for axis, (paper_key, key, over, panel_title) in zip(axes[0], panels, strict=True):
        ratios = [speedups(r, key, over) for r in results]
        measured = [statistics.median(values) for values in ratios]
        errors = [
            [m - min(values) for m, values in zip(measured, ratios, strict=True)],
            [max(values) - m for m, values in zip(measured, ratios, strict=True)],
        ]
        bars = [
            ("measured here, wall clock: median (min-max, clipped)", measured, "#1f77b4", errors),
            ("paper: over FlashAttention-3", [r["shape"]["paper"][paper_key][0] for r in results], "#c7c7c7", None),
            ("paper: over FlexAttention", [r["shape"]["paper"][paper_key][1] for r in results], "#7f7f7f", None),
        ]
        for offset, (label, values, color, error) in enumerate(bars):
            xs = [p + (offset - 1) * width for p in positions]
            axis.bar(xs, values, width, label=label, color=color, yerr=error, capsize=3 if error else 0)
            if error is not None:
                for x, value in zip(xs, values, strict=True):
                    axis.text(x, 0.05, f"{value:.2f}", ha="center", va="bottom", fontsize=7, color="white")
        cpu = [statistics.median(speedups(r, key, over, "cpu_seconds")) for r in results]
        axis.scatter(
            [p - width for p in positions], cpu, marker="D", s=16, color="black", zorder=4, label="measured, CPU time"
        )
        axis.hlines(
            bounds,
            [p - 1.6 * width for p in positions],
            [p + 1.6 * width for p in positions],
            colors="#d62728",
            linewidth=2,
            label="token-count bound (non-padding tokens)",
        )
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(positions, names, rotation=15, ha="right")
        axis.set_title(panel_title, fontsize=10)
        axis.set_ylabel("speedup (x)")
        axis.set_ylim(0.0, top * 1.25)
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=130)
    plt.close(figure)


def render(payload: dict[str, Any], stem: Path) -> str:
    """Writes ``stem``.md and ``stem``.png from a run's payload (what ``stem``.json holds); returns the markdown."""
    args, costs, results, dims = payload["args"], payload["costs"], payload["results"], payload["dims"]
    header = "\n".join(
        [
            f"# Prefix-sharing DPO throughput ({payload['date']})",
            "",
            f"- command: `{payload['command']}`",
            f"- machine: {payload['machine']}; shared with other jobs while it ran",
            f"- model: tiny Llama {dims}, vocab {payload['vocab_size']}, float32, attention "
            f"`{args['attn_implementation']}`, reference model on",
            f"- batches: {args['batch_size']} examples per step unpacked; {args['packing_rows']} row per step packed, "
            f"packing length = the paper's rule (1.1 x p95 of the prefix-shared lengths, rounded up to 128) x "
            f"{args['packing_factor']}, the same for both packing configurations",
            f"- timing: {args['warmup_steps']} untimed warm-up step per configuration "
            f"{'before every shape' if args['warmup_all'] else 'before the first shape'}, then {args['repeats']} "
            "timed epochs per configuration over the same examples in the same batches, configurations interleaved; "
            "speedups are medians of per-repeat ratios (min-max in brackets); total wall time "
            f"{payload['elapsed_seconds'] / 60:.1f} min",
            "- tokens/s: standard-DPO non-padding tokens (2 x prompt + chosen + rejected) per second, the same work "
            "unit for every configuration. Token bound: those tokens / prefix-shared tokens (prompt + chosen + "
            "rejected), the speedup if cost were proportional to non-padding tokens",
            "- wall clock is the throughput; CPU time (one torch thread, no dataloader workers) is the same "
            "measurement without the stalls from other jobs on the machine, so it varies much less between repeats",
        ]
    )
    body = "\n\n".join(
        [
            header,
            "## Prefix sharing over the baseline, against the token-count bound",
            bound_table(results),
            "## With packing: prefix sharing + packing over packing",
            packed_table(results),
            "## Throughput, all configurations",
            throughput_table(results),
            "## Where the work goes (counted from the collated batches)",
            f"Cost model, multiply-adds of one forward: {costs['body_per_token']:,.0f} per padded position (layers' "
            f"projections) + {costs['attention_per_token_per_key']:,.0f} per attention pair (sdpa with a dense mask "
            f"visits every pair of a row, padding included) + {costs['head_per_scored_token']:,.0f} per LM-head "
            "position (TRL's fused head scores every position of the standard layout off Triton devices; the shared "
            "forward scores completion tokens only).",
            work_table(results, costs),
        ]
    )
    Path(f"{stem}.md").write_text(body + "\n")
    title = (
        f"Prefix-sharing speedup on CPU (tiny Llama {dims['hidden_size']}x{dims['num_hidden_layers']}, "
        f"{payload['date']}) beside the paper (8xH100, Mistral-7B)"
    )
    plot(results, Path(f"{stem}.png"), title)
    return body


def machine_description() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    plural = "" if threads == 1 else "s"
    return f"{model}, {os.cpu_count()} CPUs ({threads} torch thread{plural}), {device}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------------------------------


def categorize(name: str, shapes: str, vocab_size: int) -> str:
    """Op name and input shapes to a cost bucket.

    The LM head is every op with a vocabulary-sized dimension: TRL's chunked log-prob kernel runs its projection and
    a handful of elementwise passes (max, exp, sums, gathers, and their backward) over ``positions x vocab`` values.
    """
    lowered = name.lower()
    if "scaled_dot_product" in lowered or "flash_attention" in lowered or "efficient_attention" in lowered:
        return "attention (sdpa)"
    if "_foreach" in lowered or "adam" in lowered:
        return "optimizer"
    if f"{vocab_size}]" in shapes or f"{vocab_size}," in shapes or "chunkedlogprob" in lowered:
        return "LM head (projection + log-softmax)"
    if any(op in lowered for op in ("::mm", "::addmm", "::bmm", "::matmul", "::linear")):
        return "linear layers (body)"
    return "other (norms, rotary, activations, masks, copies)"


def profile_shape(shape: Shape, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, output_dir: Path) -> str:
    """One epoch per configuration under torch.profiler; self CPU time per cost bucket and the top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    centers, pool, pool_lengths = calibrate(shape, tokenizer, args.pool_size, args.seed, args.calibration_rounds)
    dataset = pool.select(representative_subset(pool_lengths, examples_for(pool_lengths, args), args.seed))
    dims = model_dims(args)
    policy = build_model(dims, args.attn_implementation, args.seed)
    reference = build_model(dims, args.attn_implementation, args.seed + 1)
    vocab_size = policy.config.vocab_size
    details: list[str] = []
    buckets: dict[str, dict[str, float]] = {}
    lengths: Lengths | None = None
    for key in args.configs:
        config = CONFIGS[key]
        packing_length = None
        if config.packing:
            assert lengths is not None, "profile an unpacked configuration first"
            packing_length = choose_packing_length(lengths, args)
        trainer = make_trainer(config, dataset, policy, reference, tokenizer, args, packing_length, output_dir)
        lengths = lengths or tokenized_lengths(trainer)
        run_epoch(trainer, max_steps=args.warmup_steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            result = run_epoch(trainer)
        totals: dict[str, float] = {"epoch wall time": result.seconds}
        for event in profiler.key_averages(group_by_input_shape=True):
            bucket = categorize(event.key, str(event.input_shapes), vocab_size)
            totals[bucket] = totals.get(bucket, 0.0) + event.self_cpu_time_total / 1e6
        buckets[key] = totals
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        details += [f"### {config.label}: {result.seconds:.2f} s", "", "```", table, "```", ""]
        del trainer
        gc.collect()
    assert lengths is not None
    lines = [
        f"# Profile: {shape.name} shape ({date.today().isoformat()})",
        "",
        f"{len(dataset)} examples (token bound {lengths.bound:.2f}), tiny Llama {dims}, one epoch per configuration "
        f"under torch.profiler after {args.warmup_steps} warm-up step; machine: {machine_description()}.",
        "Self CPU time of every op, bucketed: the LM head is every op with a vocabulary-sized dimension (projection, "
        "log-softmax passes, their backward); attention is sdpa forward and backward; linear layers are the other "
        "matmuls.",
        "",
        "| bucket (self CPU s) | " + " | ".join(CONFIGS[key].label for key in buckets) + " |",
        "| --- |" + " ---: |" * len(buckets),
    ]
    names = ["epoch wall time"] + sorted(
        {bucket for totals in buckets.values() for bucket in totals} - {"epoch wall time"}
    )
    for bucket in names:
        lines.append(
            f"| {bucket} | " + " | ".join(f"{totals.get(bucket, 0.0):.2f}" for totals in buckets.values()) + " |"
        )
    lines += ["", "## Top ops per configuration", "", *details]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (median reported)")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="untimed steps per configuration before timing the first shape"
    )
    parser.add_argument("--warmup-all", action="store_true", help="warm up before every shape, not only the first")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step without packing")
    parser.add_argument("--packing-rows", type=int, default=1, help="packed rows per step")
    parser.add_argument(
        "--packing-length",
        default="auto",
        help="tokens per packed row, or 'auto': the paper's rule, 1.1 x p95 of the example lengths,\n"
        "rounded up to 128, x --packing-factor",
    )
    parser.add_argument(
        "--packing-factor",
        type=int,
        default=2,
        help="the rule's multiplier (the paper's is 4; on CPU a packed row costs attention over the whole row,\n"
        "quadratic in its length, so 2 keeps runs short)",
    )
    parser.add_argument(
        "--tokens-per-shape",
        type=int,
        default=4000,
        help="examples per shape: about this many standard-DPO tokens (rounded up to whole batches)",
    )
    parser.add_argument("--examples", type=int, default=None, help="fixed number of examples per shape instead")
    parser.add_argument(
        "--steps", type=int, default=None, help="unpacked steps per timed epoch instead: examples = steps x batch size"
    )
    parser.add_argument("--pool-size", type=int, default=400, help="calibration pool the examples are drawn from")
    parser.add_argument(
        "--recalibrate",
        dest="calibration_rounds",
        nargs="?",
        type=int,
        const=12,
        default=1,
        help="redo the word-count calibration for up to N rounds (default 12) instead of using the stored centers",
    )
    parser.add_argument("--model-size", default="small", choices=list(MODEL_SIZES))
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-hidden-layers", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, a multi-threaded op waits for its slowest thread,\n"
        "so another process taking a core stalls every op; one thread slows down in proportion instead)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmark" / "results")
    parser.add_argument("--tag", default="throughput", help="file name stem of the results")
    parser.add_argument("--profile", choices=list(SHAPES), help="profile one shape instead of benchmarking")
    parser.add_argument("--render", type=Path, help="rewrite the .md and .png of a saved results .json, and exit")
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="print each shape's calibrated word centers and length statistics, then exit (with --recalibrate)",
    )
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}")
    if "baseline" not in args.configs and not args.profile:
        parser.error("speedups are relative to the baseline: keep it in --configs")
    args.configs = [key for key in CONFIGS if key in args.configs]
    if args.examples is not None and args.steps is not None:
        parser.error("--examples and --steps both set the number of examples: give one")
    return args


def quiet() -> None:
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    from embedded import load_tokenizer

    tokenizer = load_tokenizer()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    # Trainers want an output_dir; nothing is saved (save_strategy "no"), so a throwaway one keeps results/ clean.
    with tempfile.TemporaryDirectory(prefix="prefix-dpo-throughput-") as scratch:
        run(args, tokenizer, command, Path(scratch))


def run(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, command: str, scratch: Path) -> None:
    """The calibration check, a re-rendering, a profile or the benchmark, as the flags ask."""
    if args.calibrate_only:
        for key in args.shapes:
            shape = SHAPES[key]
            centers, _, lengths = calibrate(shape, tokenizer, args.pool_size, args.seed, args.calibration_rounds)
            summary = lengths.summary()
            print(
                f"{key:14s} centers ({centers[0]:.0f}, {centers[1]:.0f}) median length {summary['median_length']:.0f} "
                f"(target {shape.median_length})  median ratio {summary['median_ratio']:.2f} (target "
                f"{shape.median_ratio})  p10-p90 length {summary['p10_length']:.0f}-{summary['p90_length']:.0f}  "
                f"bound {summary['bound']:.3f}"
            )
        return

    if args.render is not None:
        payload = json.loads(args.render.read_text())
        stem = args.render.with_suffix("")
        render(payload, stem)
        print(f"wrote {stem}.md, {stem}.png")
        return

    if args.profile:
        report = profile_shape(SHAPES[args.profile], tokenizer, args, scratch)
        path = args.output_dir / f"profile-{args.profile}.md"
        path.write_text(f"{report}\ncommand: `{command}`\n")
        print(report)
        print(f"\nwrote {path}")
        return

    dims = model_dims(args)
    print(f"model {dims}; configurations {args.configs}; {args.repeats} repeats; {machine_description()}")
    started = time.perf_counter()
    results = []
    for index, key in enumerate(args.shapes):
        # Warm-up pays for the process's first calls (lazy imports, allocator growth, kernel selection); a later
        # trainer's first epoch measured no slower than its next ones, so later shapes skip it unless --warmup-all.
        warmup = args.warmup_steps if index == 0 or args.warmup_all else 0
        results.append(benchmark_shape(SHAPES[key], tokenizer, args, scratch, print, warmup))
    elapsed = time.perf_counter() - started

    vocab_size = len(tokenizer)
    payload = {
        "command": command,
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "elapsed_seconds": elapsed,
        "dims": dims,
        "vocab_size": vocab_size,
        "costs": cost_model(dims, vocab_size),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "results": results,
    }
    stem = args.output_dir / args.tag
    Path(f"{stem}.json").write_text(json.dumps(payload))
    body = render(payload, stem)
    print(f"\n{body}\n\nwrote {stem}.md, {stem}.json, {stem}.png")


if __name__ == "__main__":
    main()
