"""Vision shape: tokens, vision-tower work and CPU time of TRL's vision path against prefix sharing (and packing).

    python benchmark/vision_shape.py                               # Qwen2-VL, 256-token images, 24 pairs, 3 repeats
    python benchmark/vision_shape.py --family gemma3 --repeats 1   # any family of tests/vision_models.py

Every example is one image of ``--image-size`` pixels a side (256 tokens at 256 for Qwen2-VL: 16-pixel merged
patches) and a question of about 20 words, with a chosen and a rejected answer of 100 to 300 words: RLAIF-V's shape.
The model is the tiny offline one of ``tests/vision_models.py`` with a wider text tower (``--hidden``, ``--layers``);
its processor takes images up to ``--image-size``. Three configurations train on the same data from the same weights,
``trainer.train()`` for one epoch each, repeats interleaved:

* ``trl``: ``trl.DPOTrainer``: its collator repeats each example's images for chosen and rejected, and runs the
  prompt twice.
* ``sharing``: ``PrefixDPOTrainer`` with ``--prefix_sharing``: each image once through the vision tower, each prompt
  once through the language model.
* ``packing``: ``PrefixDPOTrainer`` with ``--enable_packing`` only (auto packing length): TRL's work, packed.
* ``sharing+packing``: both, against ``packing``.

Reported per configuration: language-model tokens (what the layout ran, padding excluded; TRL's: every sequence),
vision-tower input (pixel rows, patches for Qwen), and wall-clock and CPU time of the epoch; speedups are medians of
per-repeat ratios against ``trl`` (``sharing+packing`` also against ``packing``). On a CPU the times say how the
saved work turns into speed, not what a GPU gains: sdpa with a dense mask visits every query-key pair of a packed
row, which FlexAttention skips on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):  # the project's modules, and the offline vision models the tests use
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from report import machine_description, markdown_table  # noqa: E402

CONFIGS = ("trl", "sharing", "packing", "sharing+packing")


def vision_dataset(examples: int, image_size: int, seed: int):
    """RLAIF-V's shape: one image and a short question per prompt, answers of 100 to 300 words."""
    from datasets import Dataset
    from PIL import Image

    from embedded import WORDS

    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = []
    for _ in range(examples):
        pixels = bytes(rng.randrange(256) for _ in range(image_size * image_size * 3))
        rows.append(
            {
                "images": [Image.frombytes("RGB", (image_size, image_size), pixels)],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words(15, 25)}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": words(100, 300)}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": words(100, 300)}]}],
            }
        )
    return Dataset.from_list(rows)


def build_trainer(config: str, policy, reference, processor, dataset, args: argparse.Namespace, output: Path):
    from trl import DPOConfig, DPOTrainer

    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    common = dict(
        output_dir=str(output / config),
        report_to="none",
        bf16=False,
        per_device_train_batch_size=args.batch_size,
        max_length=None,
        num_train_epochs=1,
        logging_steps=1000,
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if config == "trl":
        trainer_cls, config_args = DPOTrainer, DPOConfig(**common)
    else:
        packing = {"enable_packing": True, "packing_length": "auto"} if "packing" in config else {}
        sharing = config.startswith("sharing")
        trainer_cls, config_args = PrefixDPOTrainer, PrefixDPOConfig(**common, prefix_sharing=sharing, **packing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=config_args,
            train_dataset=dataset,
            processing_class=processor,
        )


def run_epoch(trainer) -> dict[str, Any]:
    """One epoch of ``trainer.train()``: times, the vision tower's input rows, and the language model's tokens."""
    import vision_models

    standard_tokens = 0
    collator = trainer.data_collator

    def counting_collator(examples):
        nonlocal standard_tokens
        batch = collator(examples)
        standard_tokens += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting_collator
    try:
        with vision_models.tower_inputs(trainer.model, trainer.ref_model) as shapes:
            wall, cpu = time.perf_counter(), time.process_time()
            trainer.train()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        trainer.data_collator = collator
    computed = getattr(trainer, "tokens_computed", 0) or standard_tokens
    return {"seconds": wall, "cpu_seconds": cpu, "tower_rows": sum(shape[0] for shape in shapes), "tokens": computed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmark" / "results" / "vision-shape")
    args = parser.parse_args(argv)

    import torch
    import vision_models

    torch.set_num_threads(1)  # CPU time then measures the process alone (see report.py)
    heads = max(2, args.hidden // 64)
    sizes = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers)
    sizes.update(num_attention_heads=heads, num_key_value_heads=heads, head_dim=args.hidden // heads)
    policy, processor = vision_models.build(args.family, seed=0, attn_implementation="sdpa", **sizes)
    reference = vision_models.model(args.family, seed=1, attn_implementation="sdpa", **sizes)
    size = processor.image_processor.size
    if getattr(size, "longest_edge", None) is not None and size.shortest_edge is not None:
        size.longest_edge = args.image_size**2  # Qwen's bounds are in pixels: let the images through at full size
    dataset = vision_dataset(args.examples, args.image_size, args.seed)
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for config in CONFIGS:
                trainer = build_trainer(config, policy, reference, processor, dataset, args, Path(scratch))
                runs[config].append(run_epoch(trainer))
                print(repeat, config, runs[config][-1], flush=True)

    def ratio(config: str, clock: str, over: str = "trl") -> float:
        return statistics.median(b[clock] / a[clock] for a, b in zip(runs[config], runs[over], strict=True))

    command = "python benchmark/vision_shape.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [
        [
            config,
            str(runs[config][0]["tokens"]),
            str(runs[config][0]["tower_rows"]),
            f"{statistics.median(run['seconds'] for run in runs[config]):.2f}",
            f"{ratio(config, 'seconds'):.2f}",
            f"{ratio(config, 'cpu_seconds'):.2f}",
            f"{ratio(config, 'seconds', 'packing'):.2f}" if config == "sharing+packing" else "",
        ]
        for config in CONFIGS
    ]
    columns = [
        "config",
        "LM tokens",
        "vision-tower rows",
        "epoch s (median)",
        "over trl (wall)",
        "over trl (CPU time)",
    ]
    table = markdown_table([*columns, "over packing (wall)"], rows)
    text = (
        f"# Vision shape: TRL's vision path against prefix sharing\n\n"
        f"{date.today().isoformat()}, {machine_description()}.\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"{args.examples} pairs, one {args.image_size}x{args.image_size} image each, family {args.family} (text "
        f"hidden {args.hidden}, {args.layers} layers), batch {args.batch_size}, one epoch per run, {args.repeats} "
        "repeats interleaved. LM tokens: what one epoch's batches ran through the language model, padding excluded "
        "(the reference model runs the same again); vision-tower rows: the tower's input rows (patches for Qwen) "
        "over the epoch, policy and reference.\n\n"
        f"{table}\n"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "command": command.strip(), "runs": runs}
    args.output.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(text)


if __name__ == "__main__":
    main()
