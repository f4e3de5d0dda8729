"""Long CPU run: thousands of optimizer steps with memory (RSS) flat after warm-up and every logged loss finite.

    nice -n 19 python benchmark/long_run.py                         # 3000 steps, a sample every 100 steps
    python benchmark/long_run.py --steps 300 --every 25             # a quick look
    python benchmark/long_run.py --packing --attn eager             # the packed layout, eager attention

Trains the embedded tiny Llama with ``PrefixDPOTrainer`` (prefix sharing on) through ``trainer.train()`` on a small
synthetic Capybara-style dataset, cycled for as many epochs as the steps need, with short sequences so that a step
takes tens of milliseconds. A callback samples the process's resident memory and the logged loss every ``--every``
steps. After the warm-up (``--warmup`` of the steps: allocator pools, dataset caches and optimizer state settle), the
run fails (exit status 1) if RSS grew by more than ``--tolerance-mib`` between the first post-warm-up sample and the
median of the last quarter of samples, or if any logged loss is not finite. It prints a table and a summary line, and
writes the samples as JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's modules live in the repository root
    sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_trainer(args: argparse.Namespace, output_dir: str, callback: Any):
    from embedded import load_tokenizer, make_preference_dataset, tiny_model
    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    packing = {"enable_packing": True, "packing_length": str(args.packing_length)} if args.packing else {}
    config = PrefixDPOConfig(
        output_dir=output_dir,
        report_to="none",
        bf16=False,
        prefix_sharing=True,
        max_length=args.max_length,
        max_prompt_length=args.max_length * 3 // 4,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        max_steps=args.steps,
        logging_steps=args.every,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
        **packing,
    )
    dataset = make_preference_dataset(
        args.examples, seed=0, prompt_words=(16, 96), response_words=(3, 24), turns=(1, 3)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrefixDPOTrainer(
            model=tiny_model("llama", attn_implementation=args.attn),
            ref_model=tiny_model("llama", seed=1, attn_implementation=args.attn),
            args=config,
            train_dataset=dataset,
            processing_class=load_tokenizer(),
            callbacks=[callback],
        )


def sampler_callback(samples: list[dict[str, float]], every: int):
    from transformers import TrainerCallback

    class Sampler(TrainerCallback):
        """Every ``every`` steps: RSS, the loss Trainer logged for the last ``every`` steps, and the step time."""

        def __init__(self) -> None:
            self.last = (0, time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            step, now = state.global_step, time.perf_counter()
            previous_step, previous_time = self.last
            samples.append(
                {
                    "step": step,
                    "rss_mib": rss_mib(),
                    "loss": float(logs["loss"]),
                    "step_ms": 1000 * (now - previous_time) / max(1, step - previous_step),
                }
            )
            self.last = (step, now)

    return Sampler()


def check(samples: list[dict[str, float]], steps: int, warmup: float, tolerance_mib: float) -> dict[str, Any]:
    """The verdict: RSS growth after warm-up, its slope, and whether every loss is finite."""
    after = [sample for sample in samples if sample["step"] > warmup * steps]
    if len(after) < 4:
        raise SystemExit(f"Only {len(after)} samples after warm-up: lower --every or raise --steps.")
    baseline = after[0]["rss_mib"]
    tail = statistics.median(sample["rss_mib"] for sample in after[-max(1, len(after) // 4) :])
    xs, ys = [s["step"] for s in after], [s["rss_mib"] for s in after]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    finite = all(math.isfinite(sample["loss"]) for sample in samples)
    return {
        "baseline_rss_mib": baseline,
        "final_rss_mib": tail,
        "growth_mib": tail - baseline,
        "slope_mib_per_1000_steps": 1000 * slope,
        "losses_finite": finite,
        "first_loss": samples[0]["loss"],
        "last_loss": samples[-1]["loss"],
        "median_step_ms": statistics.median(sample["step_ms"] for sample in after),
        "passed": finite and tail - baseline <= tolerance_mib,
    }


def print_table(samples: list[dict[str, float]], verdict: dict[str, Any], warmup_step: float) -> None:
    print(f"\n{'step':>7} {'RSS MiB':>9} {'vs warm':>8} {'loss':>9} {'ms/step':>8}")
    for sample in samples:
        delta = sample["rss_mib"] - verdict["baseline_rss_mib"] if sample["step"] > warmup_step else float("nan")
        delta_text = f"{delta:+8.1f}" if math.isfinite(delta) else f"{'warm-up':>8}"
        print(
            f"{sample['step']:>7} {sample['rss_mib']:>9.1f} {delta_text} {sample['loss']:>9.4f} "
            f"{sample['step_ms']:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100, help="sample RSS and loss every N steps")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (rows with --packing)")
    parser.add_argument("--examples", type=int, default=96, help="dataset size; cycled over epochs")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--packing", action="store_true", help="pack examples into rows of --packing-length")
    parser.add_argument("--packing-length", type=int, default=512)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the steps before memory is judged")
    parser.add_argument("--tolerance-mib", type=float, default=32.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a shared CPU)")
    parser.add_argument("--output", type=Path, help="write the samples and the verdict as JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(args, output_dir, sampler_callback(samples, args.every))
        start_rss, start = rss_mib(), time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    verdict = check(samples, args.steps, args.warmup, args.tolerance_mib)
    print_table(samples, verdict, args.warmup * args.steps)
    layout = "packed" if args.packing else "shared rows"
    print(
        f"\n{args.steps} steps ({layout}, {args.attn}, batch {args.batch_size}, max_length {args.max_length}) in "
        f"{wall:.0f} s, {verdict['median_step_ms']:.1f} ms/step. RSS {start_rss:.0f} MiB before training, "
        f"{verdict['baseline_rss_mib']:.1f} MiB after warm-up, {verdict['final_rss_mib']:.1f} MiB at the end: "
        f"{verdict['growth_mib']:+.1f} MiB (slope {verdict['slope_mib_per_1000_steps']:+.2f} MiB per 1000 steps, "
        f"tolerance {args.tolerance_mib:.0f} MiB). Loss {verdict['first_loss']:.4f} -> {verdict['last_loss']:.4f}, "
        f"{'all finite' if verdict['losses_finite'] else 'NOT FINITE'}. {'PASS' if verdict['passed'] else 'FAIL'}"
    )
    if args.output:
        args.output.write_text(
            json.dumps({"args": vars(args) | {"output": str(args.output)}, "samples": samples, **verdict}, indent=1)
        )
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
