"""Draws ``assets/prefix_sharing.png``: the attention mask the trainer really builds, for one example and a packed row.

    python assets/draw_mask.py [--out assets/prefix_sharing.png]

Both panels come from ``collators.build_shared_inputs`` (the layout: token order, position ids, documents, branches)
and ``collators.dense_mask`` (the mask sdpa receives), so the picture changes if the code does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))

from collators import build_shared_inputs, dense_mask  # noqa: E402

# Segments of a pair laid out alone, numbered as the branches of its tree: the prompt, then each response.
PROMPT, CHOSEN, REJECTED = 0, 1, 2
SEGMENT_COLORS = {PROMPT: "#4c72b0", CHOSEN: "#55a868", REJECTED: "#dd8452"}
SEGMENT_LETTERS = {PROMPT: "p", CHOSEN: "c", REJECTED: "r"}
PADDING_COLOR = "#b0b0b0"
BLOCKED_COLOR = "#f4f4f4"


def example(prompt: int, chosen: int, rejected: int, first_id: int = 10) -> dict[str, list[int]]:
    """Token ids do not matter to the mask; distinct ones make the layout easy to check when debugging."""
    ids = iter(range(first_id, first_id + prompt + chosen + rejected))
    return {
        "prompt_ids": [next(ids) for _ in range(prompt)],
        "chosen_ids": [next(ids) for _ in range(chosen)],
        "rejected_ids": [next(ids) for _ in range(rejected)],
    }


def branch_numbers(sequences: list[int], ends: list[int]) -> list[int]:
    """Per position: 0 in a prompt, then 1, 2, ... for the responses of its document in order. The layout gives each
    response its own subtree end; the prompt's is its document's end, which the last response shares."""
    numbers: list[int] = []
    for at, (sequence, end) in enumerate(zip(sequences, ends, strict=True)):
        same_document = at > 0 and sequences[at - 1] == sequence
        if not same_document:
            numbers.append(PROMPT)
        elif end != ends[at - 1]:
            numbers.append(numbers[-1] + 1)
        else:
            numbers.append(numbers[-1])
    return numbers


def token_labels(shared: dict, row: int) -> tuple[list[str], list[str]]:
    """Per position: the token's name (document letter + segment + index) and its color."""
    sequences = shared["sequence_ids"][row].tolist()
    branches = branch_numbers(sequences, shared["subtree_end"][row].tolist())
    several = len(set(sequences) - {-1}) > 1
    names, colors = [], []
    counts: dict[tuple[int, int], int] = {}
    for sequence, branch in zip(sequences, branches, strict=True):
        if sequence < 0:
            names.append("pad")
            colors.append(PADDING_COLOR)
            continue
        index = counts.get((sequence, branch), 0)
        counts[(sequence, branch)] = index + 1
        prefix = "ABCDEFGH"[sequence] if several else ""
        names.append(f"{prefix}{SEGMENT_LETTERS[branch]}{index}")
        colors.append(SEGMENT_COLORS[branch])
    return names, colors


def mark_scored(axis, shared: dict, chosen: int, rejected: int) -> None:
    """Next to each query row, the completion tokens its hidden state predicts (the reads, one example)."""
    length = shared["input_ids"].shape[1]
    predicted: dict[int, list[str]] = {}
    targets = [f"c{i}" for i in range(chosen)] + [f"r{i}" for i in range(rejected)]
    reads = shared["score_index"][shared["score_inverse"]]
    for flat, target in zip(reads.tolist(), targets, strict=True):
        predicted.setdefault(flat % length, []).append(target)
    for query, tokens in predicted.items():
        axis.text(length - 0.2, query, "\u2192 " + ", ".join(tokens), va="center", fontsize=8, color="#333333")
    axis.text(length - 0.2, -0.9, "predicts", va="center", fontsize=8, color="#333333", style="italic")


def draw_panel(axis, shared: dict, title: str) -> None:
    import matplotlib.colors as mcolors

    mask = dense_mask(shared)[0, 0].numpy()
    names, colors = token_labels(shared, 0)
    positions = shared["position_ids"][0].tolist()
    length = len(names)
    # A cell takes the color of the key it attends to: which segment a query reads from is what the picture is about.
    image = np.ones((length, length, 3))
    blocked = mcolors.to_rgb(BLOCKED_COLOR)
    for query in range(length):
        for key in range(length):
            image[query, key] = mcolors.to_rgb(colors[key]) if mask[query, key] else blocked
    axis.imshow(image, interpolation="nearest")
    axis.set_xticks(np.arange(length + 1) - 0.5, minor=True)
    axis.set_yticks(np.arange(length + 1) - 0.5, minor=True)
    axis.grid(which="minor", color="white", linewidth=0.8)
    axis.tick_params(which="minor", length=0)
    font = 8 if length <= 16 else 6.5
    axis.set_xticks(range(length), [f"{n}\n{p}" for n, p in zip(names, positions, strict=True)], fontsize=font)
    axis.set_yticks(range(length), [f"{n}  {p:>2}" for n, p in zip(names, positions, strict=True)], fontsize=font)
    axis.xaxis.tick_top()
    for labels in (axis.get_xticklabels(), axis.get_yticklabels()):
        for label, color in zip(labels, colors, strict=True):
            label.set_color(color)
            label.set_fontweight("bold")
    # Document boundaries (packed rows): thin dark lines between documents.
    sequences = shared["sequence_ids"][0].tolist()
    for index in range(1, length):
        if sequences[index] != sequences[index - 1]:
            axis.axvline(index - 0.5, color="#333333", linewidth=1.2)
            axis.axhline(index - 0.5, color="#333333", linewidth=1.2)
    axis.set_xlabel("key (token / position id)", fontsize=9)
    axis.set_ylabel("query (token, position id)", fontsize=9)
    axis.xaxis.set_label_position("top")
    axis.set_title(title, fontsize=10, pad=12)


def draw(out: Path, single: Sequence[int], packed: Sequence[Sequence[int]], packing_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    one = build_shared_inputs([example(*single)], [[0]], pad_token_id=0)
    row = build_shared_inputs(
        [example(*sizes, first_id=100 * (i + 1)) for i, sizes in enumerate(packed)],
        [list(range(len(packed)))],
        pad_token_id=0,
        length=packing_length,
    )
    figure, axes = plt.subplots(1, 2, figsize=(15, 8.2), gridspec_kw={"width_ratios": [1, 1.45]})
    p, c, r = single
    draw_panel(axes[0], one, f"one example, prefix shared: prompt {p}, chosen {c}, rejected {r} tokens")
    mark_scored(axes[0], one, c, r)
    sizes = ", ".join(f"{'ABCDEFGH'[i]} {a}/{b}/{d}" for i, (a, b, d) in enumerate(packed))
    draw_panel(
        axes[1],
        row,
        f"a packed row of {packing_length} tokens, examples (prompt/chosen/rejected) {sizes}, then padding",
    )
    legend = [
        mpatches.Patch(color=SEGMENT_COLORS[PROMPT], label="key in the prompt (seen by both responses)"),
        mpatches.Patch(color=SEGMENT_COLORS[CHOSEN], label="key in the chosen response"),
        mpatches.Patch(color=SEGMENT_COLORS[REJECTED], label="key in the rejected response"),
        mpatches.Patch(color=BLOCKED_COLOR, label="masked (not attended)"),
        mpatches.Patch(color=PADDING_COLOR, label="padding: attends to padding only, never scored"),
    ]
    figure.legend(handles=legend, loc="lower center", ncol=5, fontsize=9, frameon=False)
    figure.text(
        0.5,
        0.04,
        "Rows are queries, columns keys; a colored cell: the query attends to that key. Numbers are position ids: "
        "the rejected response restarts at the position after the prompt,\nas if it followed the prompt alone. "
        "\u2192 marks the hidden states whose next-token log-probabilities are read. Dark lines separate the examples "
        "of a packed row. Drawn from collators.build_shared_inputs + collators.dense_mask.",
        ha="center",
        fontsize=8.5,
        color="#444444",
    )
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=140)
    plt.close(figure)


def parse_sizes(text: str) -> tuple[int, int, int]:
    prompt, chosen, rejected = (int(part) for part in text.split(","))
    return prompt, chosen, rejected


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "prefix_sharing.png")
    parser.add_argument("--single", type=parse_sizes, default=(6, 3, 4), help="prompt,chosen,rejected")
    parser.add_argument(
        "--packed", type=parse_sizes, nargs="+", default=[(4, 2, 3), (3, 2, 2), (2, 1, 2)], help="p,c,r per example"
    )
    parser.add_argument("--packing-length", type=int, default=24)
    args = parser.parse_args(argv)
    draw(args.out, args.single, args.packed, args.packing_length)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
