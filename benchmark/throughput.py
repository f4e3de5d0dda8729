"""Training throughput of standard DPO, prefix sharing, packing and both, on synthetic data shaped like the paper's.

    python benchmark/throughput.py                       # all six shapes, 4 configurations, median of 3 repeats
    python benchmark/throughput.py --shapes capybara tldr --repeats 1 --configs baseline sharing   # a quick look
    python benchmark/throughput.py --profile capybara    # where the time goes, per configuration (torch.profiler)
    python benchmark/throughput.py --calibrate-only --recalibrate   # redo the length calibration
    # Prefix trees: tool definitions on every row, and one example per turn; exact tree-token bounds only, then timed
    python benchmark/throughput.py --shapes system-prompt multi-turn --tokens-only --examples 400 --tag trees
    python benchmark/throughput.py --shapes system-prompt multi-turn --tag trees-timing \\
        --configs baseline pairwise sharing pairwise+packing sharing+packing
    # GPU: the paper's five configurations, bf16, each configuration isolated (fresh dynamo, compile counts, memory)
    python benchmark/throughput.py --model-size qwen2-0.5b --bf16 --attn-implementation flex_attention --isolate \\
        --configs baseline baseline-flex sharing packing sharing+packing --packing-factor 4 --warmup-steps 3 \\
        --repeats 1 --gradient-checkpointing --examples 80

The dataset shapes and their synthetic data are in ``shapes.py``, the models, configurations and timed epochs in
``timing.py``, the tables and the plot in ``report.py``. Speedups are medians of per-repeat ratios (runs of one
repeat are adjacent in time, so slow load drift cancels). The prefix-tree shapes (``system-prompt``, ``multi-turn``)
compare prefix sharing, a row's sequences laid out as one prefix tree, with pairwise prefix sharing (``pairwise``,
``pairwise+packing``: each pair alone, as the paper does), in exact tree tokens and in time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))

from report import machine_description, render  # noqa: E402
from shapes import SHAPES, TREE_SHAPES, Shape, calibrate  # noqa: E402
from timing import (  # noqa: E402
    CONFIGS,
    MODEL_SIZES,
    ShapeRun,
    TreeShapeRun,
    cost_model,
    describe_model,
    model_dims,
    run_epoch,
    tree_shape_tokens,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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

    shape_run = ShapeRun(shape, tokenizer, args, output_dir, log=lambda line: None)
    vocab_size = shape_run.dims["vocab_size"]
    details: list[str] = []
    buckets: dict[str, dict[str, float]] = {}
    for key in args.configs:
        config = CONFIGS[key]
        trainer = shape_run.trainer(config)
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
    lengths, dims = shape_run.lengths, shape_run.dims
    lines = [
        f"# Profile: {shape.name} shape ({date.today().isoformat()})",
        "",
        f"{len(shape_run.dataset)} examples (token bound {lengths.bound:.2f}), {describe_model(dims)}, one epoch "
        f"per configuration under torch.profiler after {args.warmup_steps} warm-up step; machine: "
        f"{machine_description()}.",
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        choices=[*SHAPES, *TREE_SHAPES],
        help="the paper's shapes (default: all six) and/or the prefix-tree shapes (system-prompt, multi-turn)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["baseline", "sharing", "packing", "sharing+packing"],
        choices=list(CONFIGS),
        help="configurations (baseline-flex, TRL's path with flex_attention, needs a GPU)",
    )
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
    parser.add_argument(
        "--examples",
        type=int,
        default=None,
        help="fixed number of examples per shape instead (prefix-tree shapes: 48 unless given)",
    )
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
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim (adafactor saves memory)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (GPU)")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run each configuration's warm-up and repeats back to back after torch._dynamo.reset(), and record\n"
        "its warm-up (compile) seconds, peak GPU memory and compiled flex_attention variants (GPU runs)",
    )
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
        "--tokens-only",
        action="store_true",
        help="prefix-tree shapes only: write their exact tree-token bounds, time nothing",
    )
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
    if args.tokens_only and not set(args.shapes) <= set(TREE_SHAPES):
        parser.error(f"--tokens-only counts the tokens of the prefix-tree shapes {list(TREE_SHAPES)} only")
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
            if key in TREE_SHAPES:
                print(f"{key:14s} a prefix-tree shape: drawn in order, not calibrated")
                continue
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

    if args.tokens_only:
        results = []
        for key in args.shapes:
            drawn = tree_shape_tokens(TREE_SHAPES[key], tokenizer, args)
            summary = drawn["lengths"].summary()
            results.append({"shape": asdict(TREE_SHAPES[key]), "examples": summary, "trees": drawn["trees"]})
        payload = {
            "command": command,
            "date": date.today().isoformat(),
            "machine": machine_description(),
            "tokens_only": True,
            "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "results": results,
        }
        stem = args.output_dir / args.tag
        Path(f"{stem}.json").write_text(json.dumps(payload))
        print(f"{render(payload, stem)}\n\nwrote {stem}.md, {stem}.json")
        return

    if args.profile:
        report = profile_shape(SHAPES[args.profile], tokenizer, args, scratch)
        path = args.output_dir / f"profile-{args.profile}.md"
        path.write_text(f"{report}\ncommand: `{command}`\n")
        print(report)
        print(f"\nwrote {path}")
        return

    dims = model_dims(args, len(tokenizer))
    print(f"model {describe_model(dims)}; configurations {args.configs}; {args.repeats} repeats")
    print(f"machine: {machine_description()}")
    started = time.perf_counter()
    results = list(shape_results(args, tokenizer, scratch, print))
    payload = make_payload(args, dims, command, results, time.perf_counter() - started)
    stem = args.output_dir / args.tag
    Path(f"{stem}.json").write_text(json.dumps(payload))
    body = render(payload, stem)
    plotted = any("trees" not in result for result in results)  # the plot shows the paper's shapes only
    print(f"\n{body}\n\nwrote {stem}.md, {stem}.json" + (f", {stem}.png" if plotted else ""))


def shape_results(args: argparse.Namespace, tokenizer, scratch: Path, log) -> Iterator[dict[str, Any]]:
    """Each requested shape's result in turn (callers may stop early and keep what they have)."""
    for index, key in enumerate(args.shapes):
        # Warm-up pays for the process's first calls (lazy imports, allocator growth, kernel selection); a later
        # trainer's first epoch measured no slower than its next ones, so later shapes skip it unless --warmup-all.
        # Isolated configurations start from a fresh dynamo, so they always warm up (and compile) first.
        warmup = args.warmup_steps if index == 0 or args.warmup_all or args.isolate else 0
        if key in TREE_SHAPES:
            shape_run = TreeShapeRun(TREE_SHAPES[key], tokenizer, args, scratch, log)
        else:
            shape_run = ShapeRun(SHAPES[key], tokenizer, args, scratch, log)
        yield shape_run.run([CONFIGS[c] for c in args.configs], warmup)
        del shape_run
        gc.collect()


def make_payload(
    args: argparse.Namespace, dims: dict[str, Any], command: str, results: list[dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """What ``render`` turns into tables and a plot, and what the .json keeps."""
    import torch

    return {
        "command": command,
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "gpu": torch.cuda.is_available(),
        "elapsed_seconds": elapsed,
        "dims": dims,
        "costs": cost_model(dims),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "results": results,
    }


if __name__ == "__main__":
    main()
