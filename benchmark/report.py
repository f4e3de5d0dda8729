"""Tables, plot and markdown of a throughput run, rendered from its JSON payload (so a saved run can be re-rendered).

On CPU every speedup is given in wall clock and in CPU time (one torch thread: the same measurement without the
stalls from other jobs on a shared machine). On GPU, wall clock only, plus what each configuration cost to compile,
its peak memory and whether flex_attention stayed compiled. The prefix-tree shapes get their own tables: exact tree
tokens against pairwise prefix sharing, and prefix sharing (one tree per row) over pairwise sharing in time.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timing import CONFIGS, Work, describe_model

CRITERION_SHAPES = ("capybara", "metamath", "tulu")  # must reach 90% of the token bound; every shape: not slower


def speedups(result: dict[str, Any], key: str, over: str, clock: str = "seconds") -> list[float]:
    """Per-repeat ratios: each repeat's runs are adjacent in time, so the ratio cancels slow drift in machine load.

    ``clock`` is ``seconds`` (wall clock: throughput) or ``cpu_seconds`` (the process's CPU time: with one torch thread
    and no dataloader workers, time the process actually ran, which another process taking the core does not inflate).
    """
    runs = result["runs"]
    return [b[clock] / a[clock] for a, b in zip(runs[key], runs[over], strict=True)]


def fmt_range(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def baseline_ratio(result: dict[str, Any], key: str, clock: str) -> str:
    """Speedup over TRL's sdpa path, or "-" where a run cut short has no baseline."""
    return fmt_range(speedups(result, key, "baseline", clock)) if "baseline" in result["runs"] else "-"


def median_speedup(result: dict[str, Any], key: str, over: str) -> float | None:
    if not {key, over} <= result["runs"].keys():
        return None
    return statistics.median(speedups(result, key, over))


def criterion(result: dict[str, Any]) -> str:
    """The CPU done criterion on the median wall-clock speedup: 90% of the bound (three shapes), never slower (all)."""
    speedup = statistics.median(speedups(result, "sharing", "baseline"))
    checks = [f"not slower: {'yes' if speedup >= 1.0 else 'NO'}"]
    if result["shape"]["key"] in CRITERION_SHAPES:
        share = speedup / result["examples"]["bound"]
        checks.insert(0, f">= 90% of bound: {'yes' if share >= 0.9 else 'NO'}")
    return ", ".join(checks)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table; a column whose name ends in ``>`` is right-aligned (the ``>`` is not shown)."""
    names = [name.rstrip(">") for name in columns]
    rule = ["---:" if name.endswith(">") else "---" for name in columns]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [names, rule, *rows])


def bound_table(results: list[dict[str, Any]], over: str, cpu_time: bool) -> str:
    """Prefix sharing over a baseline against the token-count bound and the paper (and, on CPU, the criterion)."""
    columns = ["shape", "examples>", "median length / ratio: here (paper)", "token bound>", "speedup, wall clock"]
    columns += ["% of bound>"]
    if cpu_time:
        columns += ["speedup, CPU time", "% of bound>"]
    columns += ["paper: over FA3 / over Flex"] + (["done criterion"] if cpu_time else [])
    rows = []
    for result in results:
        if not {"sharing", over} <= result["runs"].keys():
            continue
        shape, examples = result["shape"], result["examples"]
        bound = examples["bound"]
        wall = speedups(result, "sharing", over)
        row = [
            shape["name"],
            str(examples["examples"]),
            f"{examples['median_length']:.0f} / {examples['median_ratio']:.2f} ({shape['median_length']} / "
            f"{shape['median_ratio']})",
            f"{bound:.2f}",
            fmt_range(wall),
            f"{statistics.median(wall) / bound:.0%}",
        ]
        if cpu_time:
            cpu = speedups(result, "sharing", over, "cpu_seconds")
            row += [fmt_range(cpu), f"{statistics.median(cpu) / bound:.0%}"]
        row.append(f"{shape['paper']['unpacked'][0]:.2f} / {shape['paper']['unpacked'][1]:.2f}")
        rows.append(row + ([criterion(result)] if cpu_time else []))
    return markdown_table(columns, rows)


def packed_table(results: list[dict[str, Any]], cpu_time: bool) -> str:
    """Prefix sharing + packing over packing alone (the paper's packed comparison), same rows, same examples."""
    columns = ["shape", "packing length>", "examples per row: packing / sharing + packing", "token bound>"]
    columns += ["speedup, wall clock", "% of bound>"] + (["speedup, CPU time"] if cpu_time else [])
    columns += ["paper: over FA3 / over Flex"]
    rows = []
    for result in results:
        if not {"packing", "sharing+packing"} <= result["runs"].keys():
            continue
        shape, packing = result["shape"], result["packing"]
        bound = result["examples"]["bound"]
        wall = speedups(result, "sharing+packing", "packing")
        row = [
            shape["name"],
            str(packing["packing"]["packing_length"]),
            f"{packing['packing']['examples_per_row']:.2f} / {packing['sharing+packing']['examples_per_row']:.2f}",
            f"{bound:.2f}",
            fmt_range(wall),
            f"{statistics.median(wall) / bound:.0%}",
        ]
        if cpu_time:
            row.append(fmt_range(speedups(result, "sharing+packing", "packing", "cpu_seconds")))
        rows.append(row + [f"{shape['paper']['packed'][0]:.2f} / {shape['paper']['packed'][1]:.2f}"])
    return markdown_table(columns, rows)


def throughput_table(results: list[dict[str, Any]], cpu_time: bool) -> str:
    """Samples/s and tokens/s per configuration (wall-clock medians over repeats) and speedups over the baseline; on
    an isolated run also warm-up (compilation) seconds, peak memory and compiled variants of flex_attention and
    create_block_mask."""
    isolated = any(result.get("compilation") for result in results)
    columns = ["shape", "configuration", "s / epoch", "samples/s>", "tokens/s>", "speedup vs TRL sdpa, wall clock"]
    if cpu_time:
        columns.append("speedup vs TRL sdpa, CPU time")
    if isolated:
        columns += [
            "warm-up s (compiles)>",
            "peak GPU memory, GiB>",
            "compiled variants: flex_attention / create_block_mask",
            "watchdog warnings>",
        ]
    rows = []
    for result in results:
        examples = result["examples"]["examples"]
        for index, (key, runs) in enumerate(result["runs"].items()):
            seconds = [r["seconds"] for r in runs]
            middle = statistics.median(seconds)
            row = [
                result["shape"]["name"] if index == 0 else "",
                CONFIGS[key].label,
                fmt_range(seconds),
                f"{examples / middle:.2f}",
                f"{runs[0]['tokens_standard'] / middle:,.0f}",
                baseline_ratio(result, key, "seconds"),
            ]
            if cpu_time:
                row.append(baseline_ratio(result, key, "cpu_seconds"))
            if isolated:
                cost = result["compilation"][key]
                variants = cost["variants"]
                row += [
                    f"{cost['warmup_seconds']:.1f}",
                    "-" if cost["peak_memory_gib"] is None else f"{cost['peak_memory_gib']:.1f}",
                    f"{variants.get('flex_attention', 0)} / {variants.get('create_block_mask', 0)}",
                    str(len(cost["watchdog_warnings"])),
                ]
            rows.append(row)
    return markdown_table(columns, rows)


def work_table(results: list[dict[str, Any]], costs: dict[str, float], cpu_time: bool) -> str:
    """What each configuration's forwards process, counted from its batches, and the speedup that implies."""
    clock = "cpu_seconds" if cpu_time else "seconds"
    lines = [
        "| shape | configuration | non-padding tokens | padded positions | LM-head positions | attention pairs (M) "
        f"| cost-model speedup vs TRL sdpa | measured ({'CPU time' if cpu_time else 'wall clock'}) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        if "baseline" not in result["runs"]:
            continue
        work = {key: Work(**counts) for key, counts in result["work"].items() if key in result["runs"]}
        base = work["baseline"].cost(costs)
        for index, (key, counts) in enumerate(work.items()):
            measured = statistics.median(speedups(result, key, "baseline", clock))
            lines.append(
                f"| {result['shape']['name'] if index == 0 else ''} | {CONFIGS[key].label} | {counts.tokens:,} "
                f"| {counts.positions:,} | {counts.head_positions:,} | {counts.attention_pairs / 1e6:,.1f} "
                f"| {base / counts.cost(costs):.2f} | {measured:.2f} |"
            )
    return "\n".join(lines)


def tree_tokens_table(results: list[dict[str, Any]]) -> str:
    """Exact tree tokens of the prefix-tree shapes (distinct prefixes of a row's sequences), per kind of row."""
    columns = [
        "shape",
        "examples>",
        "standard DPO>",
        "pairwise sharing>",
        "tree: pairs alone>",
        "tree: unpacked batches>",
        "tree: packed rows (length)>",
        "tree: all pairs>",
        "pairwise / tree: unpacked, packed>",
        "packed rows: pairwise / tree>",
    ]
    rows = []
    for result in results:
        trees = result["trees"]
        tokens, packed_rows = trees["tokens"], trees["rows"]
        rows.append(
            [
                result["shape"]["name"],
                str(trees["examples"]),
                f"{tokens['standard']:,}",
                f"{tokens['pairwise']:,}",
                f"{tokens['tree_pairs_alone']:,}",
                f"{tokens['tree_unpacked_batches']:,} (of {trees['batch_size']})",
                f"{tokens['tree_packed_rows']:,} ({trees['packing_length']:,})",
                f"{tokens['tree_all_pairs']:,}",
                f"{tokens['pairwise'] / tokens['tree_unpacked_batches']:.2f}, "
                f"{tokens['pairwise'] / tokens['tree_packed_rows']:.2f}",
                f"{packed_rows['pairwise']} / {packed_rows['tree']}",
            ]
        )
    return markdown_table(columns, rows)


def tree_speed_table(results: list[dict[str, Any]], cpu_time: bool) -> str:
    """Prefix sharing (a row's sequences as one tree) over pairwise prefix sharing, unpacked and packed: the tokens
    each layout computed (non-padding tokens of its batches) and the speedup."""
    columns = ["shape", "layout", "tokens computed: pairwise / tree>", "speedup, wall clock"]
    columns += ["speedup, CPU time"] if cpu_time else []
    rows = []
    for result in results:
        for layout, tree, pairwise in (
            ("unpacked", "sharing", "pairwise"),
            ("packed", "sharing+packing", "pairwise+packing"),
        ):
            if not {tree, pairwise} <= result["runs"].keys():
                continue
            work = result["work"]
            row = [
                result["shape"]["name"],
                layout,
                f"{work[pairwise]['tokens']:,} / {work[tree]['tokens']:,}",
                fmt_range(speedups(result, tree, pairwise)),
            ]
            rows.append(row + ([fmt_range(speedups(result, tree, pairwise, "cpu_seconds"))] if cpu_time else []))
    return markdown_table(columns, rows)


TREE_TOKENS_NOTE = (
    "Tree tokens are exact: the distinct non-empty prefixes of a row's `prompt + chosen` and `prompt + rejected` "
    "sequences, i.e. every run of tokens that several of them start with counted once. Pairs alone: each pair its "
    "own tree (its responses sharing the tokens they start with). Unpacked batches: random batches of the run's "
    "batch size, each one tree (the bound of an unpacked layout). Packed rows: the rows best fit makes in tree tokens "
    "at the packing length (`packing.pack_rows`, the plan the packed sampler's batch count comes from). All pairs: "
    "one tree of every example, the limit as rows grow. Standard DPO runs 2P + C + R tokens a pair, pairwise sharing "
    "P + C + R."
)


def unpacked_baseline(results: list[dict[str, Any]]) -> str:
    """The paper's unpacked comparison is against FlexAttention where the run has that baseline."""
    return "baseline-flex" if all("baseline-flex" in r["runs"] for r in results) else "baseline"


def plot(results: list[dict[str, Any]], path: Path, title: str, cpu_time: bool) -> None:
    """Measured speedup per shape beside the paper's two speedups and the token-count bound, unpacked and packed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    over = unpacked_baseline(results)
    panels = []
    if all({"sharing", over} <= r["runs"].keys() for r in results):
        panels.append(("unpacked", "sharing", over, f"without packing: prefix sharing / {CONFIGS[over].label}"))
    if all("sharing+packing" in r["runs"] and "packing" in r["runs"] for r in results):
        panels.append(("packed", "sharing+packing", "packing", "with packing: prefix sharing + packing / packing"))
    if not panels:
        return
    clocks = ("seconds", "cpu_seconds") if cpu_time else ("seconds",)
    names = [r["shape"]["name"] for r in results]
    bounds = [r["examples"]["bound"] for r in results]
    # Scaled to the medians, not the error bars: one repeat stalled by another job must not flatten every bar.
    top = max(
        [*bounds]
        + [
            statistics.median(speedups(r, key, base, clock))
            for r in results
            for _, key, base, _ in panels
            for clock in clocks
        ]
        + [max(r["shape"]["paper"][paper]) for r in results for paper, *_ in panels]
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 5.0), squeeze=False)
    width = 0.26
    positions = list(range(len(results)))
    for axis, (paper_key, key, base, panel_title) in zip(axes[0], panels, strict=True):
        ratios = [speedups(r, key, base) for r in results]
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
        if cpu_time:
            cpu = [statistics.median(speedups(r, key, base, "cpu_seconds")) for r in results]
            axis.scatter(
                [p - width for p in positions],
                cpu,
                marker="D",
                s=16,
                color="black",
                zorder=4,
                label="measured, CPU time",
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
    if payload.get("tokens_only"):
        return render_tree_tokens(payload, stem)
    args, costs, dims = payload["args"], payload["costs"], payload["dims"]
    results = [result for result in payload["results"] if "trees" not in result]
    trees = [result for result in payload["results"] if "trees" in result]
    gpu = payload.get("gpu", False)
    dims = {"model_type": "llama", "vocab_size": payload.get("vocab_size"), "tie_word_embeddings": False, **dims}
    isolated = args.get("isolate", False)
    precision = "bf16 weights and autocast" if args.get("bf16") else "float32"
    order = (
        "each configuration's warm-up and epochs back to back, dynamo reset before each configuration"
        if isolated
        else "configurations interleaved"
    )
    header = [
        f"# Prefix-sharing DPO throughput ({payload['date']})",
        "",
        f"- command: `{payload['command']}`",
        f"- machine: {payload['machine']}" + ("" if gpu else "; shared with other jobs while it ran"),
        f"- model: {describe_model(dims)}, {precision}, attention `{args['attn_implementation']}` (TRL sdpa baseline: "
        f"sdpa), gradient checkpointing {'on' if args.get('gradient_checkpointing') else 'off'}, reference model on",
        f"- batches: {args['batch_size']} examples per step unpacked; {args['packing_rows']} row per step packed, "
        f"packing length = the paper's rule (1.1 x p95 of the prefix-shared lengths, rounded up to 128) x "
        f"{args['packing_factor']}, the same for both packing configurations",
        f"- timing: {args['warmup_steps']} untimed warm-up steps per configuration "
        f"{'before every shape' if args['warmup_all'] or isolated else 'before the first shape'}, then "
        f"{args['repeats']} timed epoch(s) per configuration over the same examples in the same batches, {order}; "
        "speedups are medians of per-repeat ratios (min-max in brackets); total wall time "
        f"{payload['elapsed_seconds'] / 60:.1f} min",
        "- tokens/s: standard-DPO non-padding tokens (2 x prompt + chosen + rejected) per second, the same work "
        "unit for every configuration. Token bound: those tokens / prefix-shared tokens (prompt + chosen + "
        "rejected), the speedup if cost were proportional to non-padding tokens",
    ]
    if not gpu:
        header.append(
            "- wall clock is the throughput; CPU time (one torch thread, no dataloader workers) is the same "
            "measurement without the stalls from other jobs on the machine, so it varies much less between repeats"
        )
    else:
        header.append(
            "- warm-up seconds include compiling flex_attention and create_block_mask; peak GPU memory is what the "
            "configuration allocated on top of the two master copies of the models it copies from"
        )
    sections = ["\n".join(header)]
    if results:
        sections += [
            "## Prefix sharing over TRL's path (sdpa), against the token-count bound",
            bound_table(results, "baseline", cpu_time=not gpu),
        ]
        if unpacked_baseline(results) == "baseline-flex":
            sections += [
                "## Prefix sharing over TRL's path with flex_attention (the paper's Flex baseline)",
                bound_table(results, "baseline-flex", cpu_time=not gpu),
            ]
        sections += ["## With packing: prefix sharing + packing over packing", packed_table(results, cpu_time=not gpu)]
    if trees:
        sections += [
            "## Prefix trees: exact tokens",
            TREE_TOKENS_NOTE,
            tree_tokens_table(trees),
            "## Prefix trees: prefix sharing (one tree per row) over pairwise prefix sharing",
            tree_speed_table(trees, cpu_time=not gpu),
        ]
    sections += [
        "## Throughput, all configurations",
        throughput_table(results + trees, cpu_time=not gpu),
        "## Where the work goes (counted from the collated batches)",
        f"Cost model, multiply-adds of one forward: {costs['body_per_token']:,.0f} per padded position (layers' "
        f"projections) + {costs['attention_per_token_per_key']:,.0f} per attention pair (sdpa with a dense mask "
        f"visits every pair of a row, padding included) + {costs['head_per_scored_token']:,.0f} per LM-head "
        "position (TRL's fused head scores every position of the standard layout off Triton devices; the shared "
        "forward scores completion tokens only).",
        work_table(results + trees, costs, cpu_time=not gpu),
    ]
    body = "\n\n".join(sections)
    Path(f"{stem}.md").write_text(body + "\n")
    title = (
        f"Prefix-sharing speedup on {'GPU' if gpu else 'CPU'} ({dims['model_type']} {dims['hidden_size']}x"
        f"{dims['num_hidden_layers']}, {payload['date']}) beside the paper (8xH100, Mistral-7B)"
    )
    if results:
        plot(results, Path(f"{stem}.png"), title, cpu_time=not gpu)
    return body


def render_tree_tokens(payload: dict[str, Any], stem: Path) -> str:
    """Writes ``stem``.md of a ``--tokens-only`` run: the prefix-tree shapes' exact tree tokens, nothing timed."""
    args = payload["args"]
    body = "\n\n".join(
        [
            "\n".join(
                [
                    f"# Prefix trees: token bounds ({payload['date']})",
                    "",
                    f"- command: `{payload['command']}`",
                    f"- machine: {payload['machine']}",
                    "- examples: the first ones of each shape (whole conversations, in order), tokenized as "
                    f"`PrefixDPOTrainer` prepares them (embedded tokenizer, max length {args['max_length']}); "
                    "packing length: the paper's rule on the pairwise lengths (1.1 x p95, rounded up to 128) x "
                    f"{args['packing_factor']}, at least the longest unshared pair; unpacked batches of "
                    f"{args['batch_size']} pairs",
                ]
            ),
            TREE_TOKENS_NOTE,
            tree_tokens_table(payload["results"]),
        ]
    )
    Path(f"{stem}.md").write_text(body + "\n")
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
