"""The paper's six dataset shapes, and synthetic preference data drawn to follow them; and two prefix-tree shapes.

The shapes follow Table 1 of the paper: the median overall length and the median prefix-to-completion ratio of each
dataset. Read here as: overall = prompt + chosen + rejected tokens, ratio = prompt / mean(chosen, rejected) tokens,
both per example, tokenized as the trainer tokenizes (chat template, EOS). Lengths are drawn log-uniformly around a
center with a per-dataset spread (long-tailed, like real chat data), and the centers are calibrated on the embedded
tokenizer until the medians match (``python benchmark/throughput.py --calibrate-only`` shows them). The timed examples
are the subset of a 400-example pool closest to the pool in median length, median ratio, token bound and length
deciles, so that a handful of examples still follows the shape's distribution.

The prefix-tree shapes (:data:`TREE_SHAPES`) are where the sequences of a row share more than one pair's prompt, so
that a prefix tree over the row runs fewer tokens than pairwise prefix sharing: one long block of tool definitions as
the system prompt of every conversation, and multi-turn conversations turned into one example per turn, each prompt
extending the one before. They have no paper counterpart; their examples are the first ones drawn (whole
conversations, in order), not a representative subset, which would break conversations apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


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


@dataclass(frozen=True)
class TreeShape:
    """Conversations whose examples share prefixes beyond their own pair, drawn by
    ``embedded.make_multiturn_preference_dataset``.

    ``tools``: tool definitions in the system prompt that starts every conversation (``embedded.tool_definitions``,
    about 56 tokens each; 0 for no system prompt); ``turns``: user turns per conversation, an example each;
    ``prompt_words``/``response_words``: word-count bounds of each user turn and each answer.
    """

    key: str
    name: str
    tools: int
    turns: tuple[int, int]
    prompt_words: tuple[int, int]
    response_words: tuple[int, int]

    def generate(self, num_examples: int, seed: int) -> Dataset:
        """The first ``num_examples`` examples (prefix-stable), in conversation order."""
        from embedded import make_multiturn_preference_dataset, tool_definitions

        conversations = make_multiturn_preference_dataset(
            num_examples,  # at least one example each: enough conversations
            self.turns,
            seed,
            prompt_words=self.prompt_words,
            response_words=self.response_words,
            system_prompt=tool_definitions(self.tools) if self.tools else None,
        )
        return conversations.select(range(num_examples))


TREE_SHAPES: dict[str, TreeShape] = {
    shape.key: shape
    for shape in (
        TreeShape("system-prompt", "Tool definitions on every row", 24, (1, 1), (20, 200), (20, 150)),
        TreeShape("multi-turn", "Multi-turn, an example per turn", 0, (2, 6), (20, 120), (20, 150)),
    )
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
