"""The FlexAttention BlockMask builder: seconds and peak memory per batch, against ``create_block_mask``.

    python benchmark/mask_builder.py                                  # CPU: 2k/8k/16k/32k-token packed rows
    python benchmark/mask_builder.py --device cuda --rows 8           # GPU: milliseconds per batch of 8 rows
    python benchmark/mask_builder.py --json benchmark/results/mask-builder.json

Each measurement runs in a fresh process, so that its peak memory is its own: on CPU the peak resident set size
(``ru_maxrss``) above that of the process before the build, on CUDA ``torch.cuda.max_memory_allocated``. The rows are
packed like the paper's Capybara shape (prompt about 1,000 tokens, responses about 300, drawn log-uniformly) up to
the row length, then padded; every layout is built twice (full attention and a 4,096-token sliding window), as a model
with both layer kinds does. ``closed form`` is ``collators.block_mask``; ``create_block_mask`` is torch's builder,
uncompiled (it evaluates the mask at every query-key pair), or compiled with ``--compiled``; its rows are skipped
above ``--reference-max`` tokens, where its ``length x length`` mask no longer fits in reasonable memory on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))

BUILDERS = ("closed_form", "create_block_mask")
WINDOW = 4096


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--rows", type=int, default=1, help="rows per batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max", type=int, default=16384, help="longest row create_block_mask builds")
    parser.add_argument("--compiled", action="store_true", help="time torch.compile(create_block_mask) instead")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--one", nargs=2, metavar=("BUILDER", "LENGTH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def packed_layout(length: int, rows: int, device: str, seed: int = 0):
    """``rows`` packed rows of ``length`` tokens: Capybara-like pairs, next-fit, padding at the end of each row."""
    import torch

    from collators import build_shared_inputs

    rng = random.Random(seed)

    def tokens(median: int) -> list[int]:
        return [rng.randrange(1000)] * max(1, round(median * math.exp(rng.uniform(-1, 1))))

    examples, layout, row, used = [], [], [], 0
    while len(layout) < rows:
        example = {"prompt_ids": tokens(1000), "chosen_ids": tokens(300), "rejected_ids": tokens(300)}
        size = sum(map(len, example.values()))
        if size > length:
            continue
        if used + size > length:
            layout.append(row)
            row, used = [], 0
            continue
        row.append(len(examples))
        examples.append(example)
        used += size
    shared = build_shared_inputs(examples, layout, 0, length=length)
    return {name: value.to(device) for name, value in shared.items() if isinstance(value, torch.Tensor)}


def measure_one(builder: str, length: int, args: argparse.Namespace) -> dict[str, float]:
    """One builder at one length, in this process: median seconds of ``repeats`` builds, and the peak memory."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from collators import _mask_mod, block_mask

    shared = packed_layout(length, args.rows, args.device)
    cuda = args.device.startswith("cuda")
    reference = torch.compile(create_block_mask) if args.compiled else create_block_mask

    def build() -> None:
        for window in (None, WINDOW):
            if builder == "closed_form":
                block_mask(shared, window)
            else:
                window_tensor = torch.tensor(2**40 if window is None else window, device=args.device)
                tokens = shared["visible_from"], shared["subtree_end"], shared["position_ids"]
                mask_mod = _mask_mod(*tokens, window_tensor)
                reference(mask_mod, args.rows, None, length, length, device=args.device)
        if cuda:
            torch.cuda.synchronize()

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_cuda = torch.cuda.memory_allocated()
    first = time.perf_counter()
    build()  # the first build: compiles, for --compiled
    first = time.perf_counter() - first
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        build()
        seconds.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() - start_cuda
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) * 1024
    )
    return {"first_seconds": first, "seconds": statistics.median(seconds), "peak_mib": peak / 2**20}


def run_isolated(builder: str, length: int, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, float]:
    command = [sys.executable, __file__, *argv, "--one", builder, str(length)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args)))
        return
    import torch

    reference_name = "create_block_mask" + (" (compiled)" if args.compiled else "")
    print(
        f"device {args.device}, torch {torch.__version__}, {args.rows} row(s) per batch, full + {WINDOW}-token "
        f"window, median of {args.repeats}"
    )
    print(f"| tokens per row | closed form: s | MiB | {reference_name}: s | first s | MiB | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for length in args.lengths:
        ours = run_isolated("closed_form", length, args, argv)
        theirs = (
            run_isolated("create_block_mask", length, args, argv)
            if length <= args.reference_max
            else {"skipped": f"longer than --reference-max {args.reference_max}"}
        )
        results.append({"length": length, "closed_form": ours, "create_block_mask": theirs})

        def cell(result: dict, key: str, digits: int) -> str:
            return f"{result[key]:.{digits}f}" if key in result else result.get("error", "-")

        ratio = f"{theirs['seconds'] / ours['seconds']:.0f}x" if "seconds" in theirs and "seconds" in ours else "-"
        print(
            f"| {length} | {cell(ours, 'seconds', 4)} | {cell(ours, 'peak_mib', 0)} | {cell(theirs, 'seconds', 3)} "
            f"| {cell(theirs, 'first_seconds', 2)} | {cell(theirs, 'peak_mib', 0)} | {ratio} |",
            flush=True,
        )
    if args.json:
        meta = {"device": args.device, "torch": torch.__version__, "rows": args.rows, "window": WINDOW}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
