"""Length profile of a preference dataset as the trainer tokenizes it, and what prefix sharing can save on it.

    python benchmark/dataset_stats.py                                     # the embedded demo dataset
    python benchmark/dataset_stats.py --dataset_name data.jsonl --tokenizer path/to/model
    python benchmark/dataset_stats.py --dataset_name argilla/distilabel-capybara-dpo-7k-binarized \\
        --tokenizer mistralai/Mistral-7B-Instruct-v0.1 --max_length 2842 --max_prompt_length 2180

Prints the paper's Table 1 numbers, read as: overall = prompt + chosen + rejected tokens, ratio = prompt /
mean(chosen, rejected) tokens, both per example (medians over the dataset); the token-count bound of the prefix-sharing
speedup (tokens standard DPO runs / tokens prefix sharing runs, padding excluded); and the packing length that
``--packing_length auto`` would choose.

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


def prepare(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> Dataset:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` exactly as ``PrefixDPOTrainer`` prepares its train split."""
    import tempfile

    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PrefixDPOConfig(
            output_dir=output_dir,
            prefix_sharing=True,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            dataset_num_proc=args.dataset_num_proc,
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
    parser.add_argument("--max_length", type=int, help="truncate as the trainer would with --max_length")
    parser.add_argument("--max_prompt_length", type=int, help="... and --max_prompt_length")
    parser.add_argument("--packing_factor", type=int, default=4, help="examples per row in the auto rule (paper: 4)")
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
    loaded = load_preference_dataset(script_args)
    if args.split not in loaded:
        raise SystemExit(f"no split {args.split!r} in the dataset; it has {list(loaded)}")
    dataset = loaded[args.split]
    if args.num_examples is not None:
        dataset = dataset.select(range(min(args.num_examples, len(dataset))))
    tokenizer = load_tokenizer(args.tokenizer)
    prepared = prepare(dataset, tokenizer, args)
    lengths = [[len(ids) for ids in prepared[column]] for column in ("prompt_ids", "chosen_ids", "rejected_ids")]
    stats = shape_statistics(*lengths, packing_factor=args.packing_factor)
    print(report(args.dataset_name or "embedded demo dataset", stats, len(dataset) - len(prepared)))
    if args.json is not None:
        args.json.write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
