"""Groups shape and reward models: tokens and training time of the standard path, pairwise prefix sharing and groups.

    python benchmark/groups.py                                    # K=4 responses per prompt, all 6 pairs, DPO + RM
    python benchmark/groups.py --responses 7 --prompts 4          # K=7: 21 pairs per prompt
    python benchmark/groups.py --prompt-words 580 --response-words 370 --repeats 3   # the issue's 712 / 448 tokens

The data is ``embedded.make_grouped_preference_dataset``: every prompt has K responses, binarized into all K(K-1)/2
pairs, so that each response appears in K - 1 pairs. Word counts are fixed (not drawn) so the shape is the one asked
for; the token counts below are the trainer's own (chat template, EOS). Three configurations train on the same pairs,
from the same weights, through ``trainer.train()``, one epoch each, repeats interleaved:

* ``standard``: ``prefix_sharing=False``, TRL's own path: every pair is two sequences.
* ``pairwise``: prefix sharing as the paper does it, each pair alone (``group_prompts=False`` on the collator), in the
  same batches as ``grouped``.
* ``grouped``: prefix sharing with ``--group_by_prefix``: each batch holds whole groups (batch size K(K-1)/2 pairs), a
  group runs as one ``prompt | response 1 | ... | response K`` document.

For DPO (``PrefixDPOTrainer``, with a reference model) and for a reward model (``PrefixRewardTrainer``). The token
bounds are computed from the tokenized pairs: standard = sum(2P + C + R), pairwise = sum(P + C + R), grouped = per
prompt P + its distinct responses. ``tokens/computed`` is what the layouts ran, padding excluded. Speedups are medians
of per-repeat ratios of wall-clock time (CPU time of the process, which other jobs disturb less, beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))

CONFIGS = ("standard", "pairwise", "grouped")
TRAINERS = ("dpo", "reward")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (K); all K(K-1)/2 pairs")
    parser.add_argument("--prompts", type=int, default=6, help="prompts, i.e. groups, per epoch")
    parser.add_argument("--prompt-words", type=int, default=290, help="words of each prompt's conversation")
    parser.add_argument("--response-words", type=int, default=180, help="words of each response")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def dataset(args: argparse.Namespace):
    from embedded import make_grouped_preference_dataset
    from preference_data import normalize_schema

    words = (args.prompt_words, args.prompt_words), (args.response_words, args.response_words)
    data = make_grouped_preference_dataset(
        args.prompts, args.responses, prompt_words=words[0], response_words=words[1], turns=(1, 1)
    )
    return normalize_schema(data)  # both trainers read it as conversations with an implicit prompt


def token_bounds(examples: list[dict[str, list[int]]]) -> dict[str, int]:
    from collators import layout_sizes, prompt_rows
    from packing import row_tokens

    grouped = sum(row_tokens(layout_sizes([examples[i] for i in row])) for row in prompt_rows(examples))
    pairwise = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    return {
        "standard": pairwise + sum(len(e["prompt_ids"]) for e in examples),
        "pairwise": pairwise,
        "grouped": grouped,
    }


def make_trainer(kind: str, config: str, data, args: argparse.Namespace, output_dir: str):
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback

    from embedded import load_tokenizer, tiny_model_config

    model_config = tiny_model_config(
        "llama",
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=max(1, args.hidden_size // 128),
        head_dim=64,
        num_labels=1,
    )
    model_class = AutoModelForCausalLM if kind == "dpo" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class.from_config(model_config, attn_implementation=args.attn_implementation)
    pairs_per_group = args.responses * (args.responses - 1) // 2
    flags = dict(
        output_dir=output_dir,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=pairs_per_group,
        num_train_epochs=1,
        save_strategy="no",
        logging_strategy="no",
        max_length=None,
        disable_tqdm=True,
        dataloader_num_workers=0,
        prefix_sharing=config != "standard",
        group_by_prefix=config != "standard",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dpo":
            from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

            trainer = PrefixDPOTrainer(
                model=model,
                ref_model=copy.deepcopy(model),
                args=PrefixDPOConfig(**flags),
                train_dataset=data,
                processing_class=load_tokenizer(),
            )
        else:
            from prefix_reward_trainer import PrefixRewardConfig, PrefixRewardTrainer

            trainer = PrefixRewardTrainer(
                model=model, args=PrefixRewardConfig(**flags), train_dataset=data, processing_class=load_tokenizer()
            )
    if config == "pairwise":
        trainer.data_collator.group_prompts = False
    trainer.remove_callback(PrinterCallback)  # no per-run log lines between the tables
    return trainer


def time_epoch(trainer) -> dict[str, float]:
    import torch

    computed = trainer.tokens_computed
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "tokens_computed": trainer.tokens_computed - computed,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.set_verbosity_error()
    data = dataset(args)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "trainers": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for kind in args.trainers:
            trainers = {
                config: make_trainer(kind, config, data, args, f"{scratch}/{kind}-{config}") for config in CONFIGS
            }
            examples = trainers["grouped"]._layout_examples(trainers["grouped"].train_dataset)
            runs: dict[str, list[dict[str, float]]] = {config: [] for config in CONFIGS}
            for trainer in trainers.values():  # warm-up: one epoch each, untimed
                time_epoch(trainer)
            for _ in range(args.repeats):
                for config, trainer in trainers.items():
                    runs[config].append(time_epoch(trainer))
            results["trainers"][kind] = {
                "pairs": len(examples),
                "bounds": token_bounds(examples),
                "mean_lengths": {
                    column: statistics.fmean(len(e[column]) for e in examples)
                    for column in ("prompt_ids", "chosen_ids", "rejected_ids")
                },
                "runs": runs,
            }
    return results


def speedup(runs: dict[str, list[dict[str, float]]], config: str, over: str, clock: str) -> float:
    return statistics.median(b[clock] / a[clock] for a, b in zip(runs[config], runs[over], strict=True))


def render(results: dict[str, Any]) -> str:
    lines = []
    for kind, result in results["trainers"].items():
        bounds, runs, lengths = result["bounds"], result["runs"], result["mean_lengths"]
        name = "DPO (PrefixDPOTrainer, reference model)" if kind == "dpo" else "reward model (PrefixRewardTrainer)"
        lines += [
            f"### {name}: {result['pairs']} pairs, mean prompt {lengths['prompt_ids']:.0f} tokens, "
            f"responses {lengths['chosen_ids']:.0f} / {lengths['rejected_ids']:.0f}",
            "",
            "| configuration | token bound | tokens/computed per epoch | seconds per epoch (median) "
            "| speedup over standard | speedup over pairwise | CPU-time speedup over pairwise |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for config in CONFIGS:
            computed = runs[config][0]["tokens_computed"]
            seconds = statistics.median(r["seconds"] for r in runs[config])
            lines.append(
                f"| {config} | {bounds[config]:,} | {computed:,} | {seconds:.2f} "
                f"| {speedup(runs, config, 'standard', 'seconds'):.2f} "
                f"| {speedup(runs, config, 'pairwise', 'seconds'):.2f} "
                f"| {speedup(runs, config, 'pairwise', 'cpu_seconds'):.2f} |"
            )
        lines += [
            "",
            f"grouped bound: {bounds['standard'] / bounds['grouped']:.2f}x fewer tokens than standard, "
            f"{bounds['pairwise'] / bounds['grouped']:.2f}x fewer than pairwise sharing "
            f"(pairwise: {bounds['standard'] / bounds['pairwise']:.2f}x fewer than standard)",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = run(args)
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
