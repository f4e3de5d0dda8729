"""Length profile of a preference dataset as the trainer tokenizes it, and what prefix sharing can save on it.

    python benchmark/dataset_stats.py                                     # the embedded demo dataset
    python benchmark/dataset_stats.py --responses_per_prompt 4            # embedded, 4 responses per prompt, all pairs
    python benchmark/dataset_stats.py --tree_shape multi-turn --num_examples 400 --packing_length 8192
    python benchmark/dataset_stats.py --dataset_name data.jsonl --tokenizer path/to/model
    python benchmark/dataset_stats.py --dataset_name argilla/distilabel-capybara-dpo-7k-binarized \\
        --tokenizer mistralai/Mistral-7B-Instruct-v0.1 --max_length 2842 --max_prompt_length 2180

Prints the paper's Table 1 numbers, read as: overall = prompt + chosen + rejected tokens, ratio = prompt /
mean(chosen, rejected) tokens, both per example (medians over the dataset); the token-count bound of the prefix-sharing
speedup (tokens standard DPO runs / tokens prefix sharing runs, padding excluded); the packing length that
``--packing_length auto`` would choose; and how many pairs share a prompt (the same prompt tokens), with the grouped
bound: every prompt once and every distinct response of its pairs once, as ``--group_by_prefix`` runs them when a
prompt's pairs fit one batch (or packed row). Last, the prefix-tree bound (:func:`tree_statistics`): every run of
tokens that several sequences of a row start with laid out once, counted exactly (distinct prefixes) on the rows that
packing makes at ``--packing_length`` (default: the auto length), against pairwise sharing's tokens and rows.
``--tree_shape`` draws embedded data of a shape where trees pay off (``benchmark/shapes.py``: tool definitions on
every row, or one example per turn of multi-turn conversations).

The tokens are the trainer's own: the dataset goes through ``PrefixDPOTrainer``'s preparation (Capybara schema
normalization, TRL's prompt extraction, chat template and EOS handling, tokenization, then our truncation to
``--max_length``/``--max_prompt_length``). The trainer is built around a throwaway one-layer model with the
tokenizer's vocabulary, so no real model is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    if name is None:
        from embedded import load_tokenizer as embedded_tokenizer

        return embedded_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def throwaway_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A one-layer Llama with the tokenizer's vocabulary: the trainer needs a model, the statistics do not."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=1 << 20,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def prepare(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` exactly as ``PrefixDPOTrainer`` prepares its train split."""
    import tempfile

    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PrefixDPOConfig(
            output_dir=output_dir,
            prefix_sharing=True,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            dataset_num_proc=num_proc,
            report_to="none",
            bf16=False,
        )
        trainer = PrefixDPOTrainer(
            model=throwaway_model(tokenizer, 0),
            ref_model=throwaway_model(tokenizer, 1),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        return trainer.train_dataset


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def shape_statistics(prompt: list[int], chosen: list[int], rejected: list[int], packing_factor: int) -> dict[str, Any]:
    """The paper's shape numbers, the token-count bound, and the auto packing length, from per-example lengths."""
    from packing import auto_packing_length, packing_statistics

    overall = [p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    unshared = [o + p for o, p in zip(overall, prompt, strict=True)]
    ratios = [2 * p / max(c + r, 1) for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    shared_length, shared_stats = auto_packing_length(overall, examples_per_row=packing_factor)
    unshared_fit = packing_statistics(unshared, max(shared_length, max(unshared)))

    def describe(values: list[int]) -> dict[str, float]:
        return {
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "p95": percentile(values, 0.95),
            "max": max(values),
        }

    return {
        "examples": len(prompt),
        "prompt": describe(prompt),
        "chosen": describe(chosen),
        "rejected": describe(rejected),
        "overall": describe(overall),
        "median_overall_length": statistics.median(overall),
        "median_prefix_to_completion_ratio": statistics.median(ratios),
        "tokens_standard_dpo": sum(unshared),
        "tokens_prefix_sharing": sum(overall),
        "token_bound": sum(unshared) / sum(overall),
        "packing": {
            "packing_length": shared_length,
            "rule": f"1.1 x p95 of the prefix-shared lengths ({shared_stats['p95']:.0f}), rounded up to 128, "
            f"x {packing_factor}" + (", raised to the longest example" if shared_stats["raised_to_longest"] else ""),
            "examples_per_row": shared_stats["mean_examples_per_row"],
            "efficiency": shared_stats["packing_efficiency"],
            "unshared_examples_per_row": unshared_fit["mean_examples_per_row"],
            "unshared_efficiency": unshared_fit["packing_efficiency"],
        },
    }


def group_statistics(
    prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """How many pairs share a prompt (identical prompt tokens), and the tokens groups of one prompt run.

    ``tokens_grouped`` counts every distinct prompt once and every distinct response of its pairs once;
    ``tokens_pairwise`` and ``tokens_standard_dpo`` are prefix sharing's and standard DPO's counts.
    """
    groups: dict[tuple[int, ...], dict[str, Any]] = {}
    for prompt, *responses in zip(prompts, chosen, rejected, strict=True):
        group = groups.setdefault(tuple(prompt), {"pairs": 0, "responses": set()})
        group["pairs"] += 1
        group["responses"].update(tuple(response) for response in responses)
    sizes = [group["pairs"] for group in groups.values()]
    grouped = sum(len(prompt) + sum(map(len, group["responses"])) for prompt, group in groups.items())
    pairwise = sum(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True))
    standard = pairwise + sum(map(len, prompts))
    return {
        "pairs": len(prompts),
        "prompts": len(groups),
        "pairs_sharing_a_prompt": sum(size for size in sizes if size > 1),
        "prompts_with_several_pairs": sum(size > 1 for size in sizes),
        "pairs_per_prompt": {"median": statistics.median(sizes), "mean": statistics.fmean(sizes), "max": max(sizes)},
        "distinct_responses": sum(len(group["responses"]) for group in groups.values()),
        "tokens_standard_dpo": standard,
        "tokens_pairwise": pairwise,
        "tokens_grouped": grouped,
        "grouped_bound": standard / grouped,
        "grouped_over_pairwise": pairwise / grouped,
    }


def tree_statistics(
    examples: Sequence[dict[str, Sequence[int]]], packing_length: int, batch_size: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Tokens that standard DPO, pairwise prefix sharing and prefix trees run on ``examples``, and packed rows.

    Tree tokens are exact: the distinct non-empty prefixes of a row's ``prompt + chosen`` and ``prompt + rejected``
    sequences (``collators.layout_sizes``), over four kinds of rows: each pair alone (its responses sharing the tokens
    they start with); random batches of ``batch_size`` pairs, each one tree (the unpacked bound); the rows best fit
    makes at ``packing_length`` counting tree tokens (``packing.pack_rows``, the plan the packed sampler's batch count
    comes from); and all pairs as one tree (the limit as rows grow). Packed rows: how many rows of ``packing_length``
    tokens pairwise sharing and trees take, a padded row costing its whole length.
    """
    import random

    from collators import layout_sizes, shared_sequence_length
    from packing import pack_rows, row_tokens

    sizes = layout_sizes(examples)
    pairwise = [shared_sequence_length(example) for example in examples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    tree_rows, pairwise_rows = pack_rows(sizes, packing_length), pack_rows(pairwise, packing_length)
    tokens = {
        "standard": sum(shared_sequence_length(example, share_prompt=False) for example in examples),
        "pairwise": sum(pairwise),
        "tree_pairs_alone": sum(row_tokens([size]) for size in sizes),
        "tree_unpacked_batches": sum(row_tokens([sizes[i] for i in batch]) for batch in batches),
        "tree_packed_rows": sum(row_tokens([sizes[i] for i in row]) for row in tree_rows),
        "tree_all_pairs": row_tokens(sizes),
    }
    return {
        "examples": len(examples),
        "packing_length": packing_length,
        "batch_size": batch_size,
        "tokens": tokens,
        "rows": {"pairwise": len(pairwise_rows), "tree": len(tree_rows)},
        "packing_efficiency": {
            "pairwise": tokens["pairwise"] / (len(pairwise_rows) * packing_length),
            "tree": tokens["tree_packed_rows"] / (len(tree_rows) * packing_length),
        },
    }


def tree_report(trees: dict[str, Any]) -> str:
    tokens, rows, efficiency = trees["tokens"], trees["rows"], trees["packing_efficiency"]
    labels = {
        "standard": "standard DPO",
        "pairwise": "pairwise prefix sharing",
        "tree_pairs_alone": "tree, each pair alone",
        "tree_unpacked_batches": f"tree, random batches of {trees['batch_size']} pairs",
        "tree_packed_rows": f"tree, packed rows of {trees['packing_length']:,}",
        "tree_all_pairs": "tree, all pairs in one tree",
    }
    lines = [
        f"prefix trees, {trees['examples']:,} pairs (exact: a run that several sequences of a row start with, once):",
        f"  {'tokens run':38s}{'count':>14s}  {'standard /':>10s}  {'pairwise /':>10s}",
    ]
    for key, label in labels.items():
        count = tokens[key]
        ratios = f"{tokens['standard'] / count:9.3f}x  {tokens['pairwise'] / count:9.3f}x"
        lines.append(f"  {label:38s}{count:>14,}  {ratios}")
    lines.append(
        f"  packed rows of {trees['packing_length']:,} tokens: pairwise {rows['pairwise']:,} "
        f"({efficiency['pairwise']:.1%} not padding), tree {rows['tree']:,} ({efficiency['tree']:.1%}): "
        f"{rows['pairwise'] / rows['tree']:.3f}x fewer"
    )
    return "\n".join(lines)


def group_report(groups: dict[str, Any]) -> str:
    per_prompt = groups["pairs_per_prompt"]
    return "\n".join(
        [
            "pairs that share a prompt (the same prompt tokens):",
            f"  pairs / distinct prompts:            {groups['pairs']:,} / {groups['prompts']:,} "
            f"(pairs per prompt: median {per_prompt['median']:g}, mean {per_prompt['mean']:.2f}, "
            f"max {per_prompt['max']})",
            f"  pairs sharing their prompt:          {groups['pairs_sharing_a_prompt']:,} "
            f"({groups['pairs_sharing_a_prompt'] / groups['pairs']:.1%}), over "
            f"{groups['prompts_with_several_pairs']:,} prompts; {groups['distinct_responses']:,} distinct responses",
            "  grouped bound (each prompt once, each distinct response once; --group_by_prefix):",
            f"    tokens grouped:                    {groups['tokens_grouped']:,}",
            f"    bound over standard DPO:           {groups['grouped_bound']:.3f}x",
            f"    bound over pairwise sharing:       {groups['grouped_over_pairwise']:.3f}x",
        ]
    )


def report(name: str, stats: dict[str, Any], dropped: int) -> str:
    rows = [
        f"dataset: {name}",
        f"examples: {stats['examples']:,}" + (f" ({dropped:,} dropped by truncation)" if dropped else ""),
        "",
        "tokens per example      median      mean       p95       max",
    ]
    for part in ("prompt", "chosen", "rejected", "overall"):
        values = stats[part]
        rows.append(
            f"  {part:18s}{values['median']:10.0f}{values['mean']:10.1f}{values['p95']:10.0f}{values['max']:10.0f}"
        )
    packing = stats["packing"]
    rows += [
        "",
        "paper's Table 1 (overall = prompt + chosen + rejected; ratio = prompt / mean(chosen, rejected)):",
        f"  median overall length:               {stats['median_overall_length']:.0f}",
        f"  median prefix-to-completion ratio:   {stats['median_prefix_to_completion_ratio']:.2f}",
        "",
        "prefix sharing, token-count bound on the speedup:",
        f"  tokens standard DPO computes:        {stats['tokens_standard_dpo']:,}",
        f"  tokens prefix sharing computes:      {stats['tokens_prefix_sharing']:,}",
        f"  bound:                               {stats['token_bound']:.3f}x "
        f"({1 - 1 / stats['token_bound']:.1%} fewer tokens)",
        "",
        f"recommended --packing_length (auto): {packing['packing_length']}  [{packing['rule']}]",
        f"  with prefix sharing:    {packing['examples_per_row']:.2f} examples/row, "
        f"{packing['efficiency']:.1%} of row tokens are not padding",
        f"  without prefix sharing: {packing['unshared_examples_per_row']:.2f} examples/row, "
        f"{packing['unshared_efficiency']:.1%} not padding (same length, at least the longest example)",
    ]
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dataset_name", help="hub name, local dataset directory or .json/.jsonl/.parquet file (default: embedded)"
    )
    parser.add_argument("--dataset_config", help="dataset configuration name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer", help="model name or path whose tokenizer to use (default: the embedded one)")
    parser.add_argument("--num_examples", type=int, help="only the first N examples of the split")
    parser.add_argument(
        "--responses_per_prompt",
        type=int,
        help="without --dataset_name: embedded data with this many responses per prompt and all their pairs",
    )
    parser.add_argument("--max_length", type=int, help="truncate as the trainer would with --max_length")
    parser.add_argument("--max_prompt_length", type=int, help="... and --max_prompt_length")
    parser.add_argument("--packing_factor", type=int, default=4, help="examples per row in the auto rule (paper: 4)")
    parser.add_argument(
        "--packing_length", type=int, help="packed rows of the tree bound (default: the auto packing length)"
    )
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per unpacked batch of the tree bound")
    parser.add_argument(
        "--tree_shape",
        choices=["system-prompt", "multi-turn"],
        help="without --dataset_name: embedded data of this prefix-tree shape (benchmark/shapes.py)",
    )
    parser.add_argument("--dataset_num_proc", type=int)
    parser.add_argument("--json", type=Path, help="also write the statistics to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import datasets
    from transformers.utils import logging as transformers_logging
    from trl import ScriptArguments

    from train_dpo import load_preference_dataset

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    script_args = ScriptArguments(dataset_name=args.dataset_name, dataset_config=args.dataset_config)
    embedded = {"--responses_per_prompt": args.responses_per_prompt, "--tree_shape": args.tree_shape}
    given = [flag for flag, value in embedded.items() if value is not None]
    if given and args.dataset_name is not None or len(given) > 1:
        raise SystemExit(f"{' and '.join(given)} build embedded data: give one, or --dataset_name")
    if args.responses_per_prompt is not None:
        from datasets import DatasetDict

        from embedded import make_grouped_preference_dataset

        loaded = DatasetDict(train=make_grouped_preference_dataset(64, args.responses_per_prompt))
    elif args.tree_shape is not None:
        from datasets import DatasetDict
        from shapes import TREE_SHAPES

        loaded = DatasetDict(train=TREE_SHAPES[args.tree_shape].generate(args.num_examples or 256, seed=0))
    else:
        loaded = load_preference_dataset(script_args)
    if args.split not in loaded:
        raise SystemExit(f"no split {args.split!r} in the dataset; it has {list(loaded)}")
    dataset = loaded[args.split]
    if args.num_examples is not None:
        dataset = dataset.select(range(min(args.num_examples, len(dataset))))
    tokenizer = load_tokenizer(args.tokenizer)
    prepared = prepare(dataset, tokenizer, args.max_length, args.max_prompt_length, args.dataset_num_proc)
    columns = [prepared[column] for column in ("prompt_ids", "chosen_ids", "rejected_ids")]
    stats = shape_statistics(*[[len(ids) for ids in column] for column in columns], packing_factor=args.packing_factor)
    stats["groups"] = group_statistics(*columns)
    packing_length = args.packing_length or stats["packing"]["packing_length"]
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(*columns, strict=True)]
    stats["trees"] = tree_statistics(examples, packing_length, args.batch_size)
    name = args.dataset_name or "embedded demo dataset"
    if args.responses_per_prompt is not None:
        name = f"embedded data, {args.responses_per_prompt} responses per prompt and all their pairs"
    if args.tree_shape is not None:
        name = f"embedded data of the {args.tree_shape} shape"
    print(report(name, stats, len(dataset) - len(prepared)))
    print("\n" + group_report(stats["groups"]))
    print("\n" + tree_report(stats["trees"]))
    if args.json is not None:
        args.json.write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
