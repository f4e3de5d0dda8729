"""Models, trainer configurations and timed epochs: what the throughput benchmark measures, and how.

Every configuration is a ``PrefixDPOTrainer`` running real optimizer steps through ``trainer.train()`` on the same
examples, from the same initial weights, with a reference model. The baselines are ``prefix_sharing=False``, i.e.
TRL's own path, with sdpa and with flex_attention. Prefix sharing lays a row's sequences out as one prefix tree;
the pairwise configurations lay every pair out alone, as the paper does, and plan packed rows in its tokens. Each
repeat times one epoch after untimed warm-up steps.

Two schedules:
- interleaved (default, for a shared CPU machine): every configuration is built first, then each repeat runs every
  configuration in a rotated order, so that drift in machine load spreads over all of them;
- isolated (``--isolate``, for GPUs): each configuration runs its warm-up and repeats back to back in a fresh dynamo
  state (``torch._dynamo.reset()``), so that one configuration's compilations never land on the next; its warm-up
  seconds (compilation), peak GPU memory and compiled variants are recorded.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shapes import Lengths, Shape, TreeShape, calibrate, measure, representative_subset

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from prefix_dpo_trainer import PrefixDPOTrainer


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------

# The tiny Llama-style sizes are for CPU: "small" is the default, the six-shape sweep fits in about 10 minutes on 2
# CPU cores, and the body (projections + attention) costs about 3x the LM head per padded position (see `cost_model`,
# and the profile: on Capybara-shaped batches the baseline spends ~26% of its time in the head, the rest in the
# body). The GPU presets have the dims and vocabulary sizes of real models (Qwen2.5-0.5B, Llama-3.2-1B); their
# vocabulary is larger than the embedded tokenizer's, which only leaves embedding rows unused.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 512, "heads": 2, "kv_heads": 1},
    "small": {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 1024, "heads": 4, "kv_heads": 2},
    "base": {"hidden_size": 512, "num_hidden_layers": 2, "intermediate_size": 2048, "heads": 8, "kv_heads": 4},
    "medium": {"hidden_size": 768, "num_hidden_layers": 4, "intermediate_size": 3072, "heads": 12, "kv_heads": 4},
    "large": {"hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 4096, "heads": 16, "kv_heads": 8},
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "intermediate_size": 4864,
        "heads": 14,
        "kv_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "llama-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "heads": 32,
        "kv_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    # The paper's model: Mistral-7B-v0.3's dims. Its attention is full (no sliding window), which is Llama's
    # architecture. bf16 policy, reference, gradients and AdamW states take about 84 GiB (the benchmark also keeps a
    # pristine copy of both models, 28 GiB); `--optim adafactor` (factored second moments) leaves more room.
    "mistral-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "heads": 32,
        "kv_heads": 8,
        "vocab_size": 32768,
        "tie_word_embeddings": False,
    },
}


def model_dims(args: argparse.Namespace, tokenizer_vocab: int) -> dict[str, Any]:
    dims = {"model_type": "llama", "vocab_size": tokenizer_vocab, "tie_word_embeddings": False}
    dims.update(MODEL_SIZES[args.model_size])
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "heads", "kv_heads"):
        if getattr(args, name, None) is not None:
            dims[name] = getattr(args, name)
    if dims["hidden_size"] % dims["heads"] or dims["heads"] % dims["kv_heads"]:
        raise SystemExit(f"hidden size, heads and kv heads must divide: {dims}")
    return dims


def describe_model(dims: dict[str, Any]) -> str:
    return (
        f"{dims['model_type']} {parameter_count(dims) / 1e9:.2f}B (hidden {dims['hidden_size']}, "
        f"{dims['num_hidden_layers']} layers, {dims['heads']} heads, {dims['kv_heads']} kv heads, intermediate "
        f"{dims['intermediate_size']}, vocab {dims['vocab_size']})"
    )


def parameter_count(dims: dict[str, Any]) -> int:
    hidden, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = hidden // dims["heads"] * dims["kv_heads"]
    body = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    embeddings = dims["vocab_size"] * hidden * (1 if dims["tie_word_embeddings"] else 2)
    return body + embeddings


def build_model(dims: dict[str, Any], attn_implementation: str, seed: int, device: str, dtype) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    from embedded import tiny_model_config

    config = tiny_model_config(
        dims["model_type"],
        vocab_size=dims["vocab_size"],
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        intermediate_size=dims["intermediate_size"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["hidden_size"] // dims["heads"],
        tie_word_embeddings=dims["tie_word_embeddings"],
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it runs: a 1B model's init on the CPU takes longer than its epoch
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def cost_model(dims: dict[str, Any]) -> dict[str, float]:
    """Multiply-adds per token of one forward: the layers' projections and the LM head, and attention per key."""
    hidden, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = hidden // dims["heads"] * dims["kv_heads"]
    projections = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    return {
        "body_per_token": projections,
        "attention_per_token_per_key": 2 * hidden * layers,  # QK^T and AV; sdpa with a dense mask visits every key
        "head_per_scored_token": hidden * dims["vocab_size"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Configurations and trainers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    key: str
    label: str
    prefix_sharing: bool
    packing: bool
    attn_implementation: str | None = None  # None: the run's --attn-implementation
    pairwise: bool = False  # prefix sharing within each pair only, not across a row's pairs


CONFIGS: dict[str, RunConfig] = {
    config.key: config
    for config in (
        RunConfig("baseline", "TRL path, sdpa", False, False, "sdpa"),
        RunConfig("baseline-flex", "TRL path, flex_attention", False, False, "flex_attention"),
        RunConfig("pairwise", "pairwise prefix sharing", True, False, pairwise=True),
        RunConfig("sharing", "prefix sharing", True, False),
        RunConfig("packing", "packing", False, True),
        RunConfig("pairwise+packing", "pairwise prefix sharing + packing", True, True, pairwise=True),
        RunConfig("sharing+packing", "prefix sharing + packing", True, True),
    )
}


def _step_timer():
    import torch
    from transformers import TrainerCallback

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    class StepTimer(TrainerCallback):
        """Wall clock from the start of the epoch (before the first batch is collated) to the end of each step.

        On a GPU each mark waits for the queued kernels, so a step is charged for its own work."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            synchronize()
            self.marks = [time.perf_counter()]
            self.cpu_marks = [time.process_time()]

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())
            if self.echo is not None:
                self.echo(f"      step {len(self.marks) - 1}: {self.marks[-1] - self.marks[0]:6.1f} s")

    timer = StepTimer()
    timer.echo = None  # a log function, to follow warm-up steps (compilation) as they finish
    return timer


def make_trainer(
    config: RunConfig,
    dataset: Dataset,
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    packing_length: int | None,
    output_dir: Path,
) -> PrefixDPOTrainer:
    from transformers.trainer_callback import PrinterCallback

    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    packing = {"enable_packing": True, "packing_length": str(packing_length)} if config.packing else {}
    training_args = PrefixDPOConfig(
        output_dir=str(output_dir / config.key),
        prefix_sharing=config.prefix_sharing,
        per_device_train_batch_size=args.packing_rows if config.packing else args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-6,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        optim=args.optim,
        bf16=args.bf16,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=args.seed,
        **packing,
    )
    models = []
    for model in (policy, reference):
        model = copy.deepcopy(model)
        model.set_attn_implementation(config.attn_implementation or args.attn_implementation)
        models.append(model)
    timer = _step_timer()
    trainer = (pairwise_trainer_class() if config.pairwise else PrefixDPOTrainer)(
        model=models[0],
        ref_model=models[1],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.step_timer = timer
    # The printer echoes every train() call's metrics dict; the benchmark prints its own lines.
    trainer.remove_callback(PrinterCallback)
    return trainer


def pairwise_trainer_class() -> type[PrefixDPOTrainer]:
    """``PrefixDPOTrainer`` with every pair laid out alone, which the trainer has no flag for: the collator's
    ``group_prompts=False``, and packed rows planned in the tokens of pairs alone, as that collator lays them out."""
    from collators import layout_sizes
    from prefix_dpo_trainer import PrefixDPOTrainer

    class PairwiseDPOTrainer(PrefixDPOTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.data_collator.group_prompts = False

        def _example_sizes(self, dataset):
            return layout_sizes(self._layout_examples(dataset), self.shares_prefix, group_prompts=False)

    return PairwiseDPOTrainer


# ---------------------------------------------------------------------------------------------------------------------
# Work and timing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Work:
    """What one epoch's forwards process, counted from the collated batches (cheap: collation only).

    ``positions``: rows x padded length (what the layers' projections run over); ``attention_pairs``: rows x length^2
    (sdpa with a dense mask visits every query-key pair, padding included); ``head_positions``: positions scored by
    TRL's fused LM head, which off Triton devices projects every position of the standard layout, padding included,
    while the shared forward hands it only the completion tokens.
    """

    positions: int = 0
    attention_pairs: int = 0
    head_positions: int = 0
    tokens: int = 0

    def cost(self, costs: dict[str, float]) -> float:
        """Multiply-adds of one forward over the epoch under :func:`cost_model`."""
        return (
            self.positions * costs["body_per_token"]
            + self.attention_pairs * costs["attention_per_token_per_key"]
            + self.head_positions * costs["head_per_scored_token"]
        )


def count_work(trainer: PrefixDPOTrainer) -> Work:
    import torch

    work = Work()
    triton = torch.cuda.is_available()  # TRL's fused head scores only valid positions on Triton devices
    torch.manual_seed(trainer.args.seed)  # the batches `run_epoch` will time
    for batch in trainer.get_train_dataloader():
        shared = batch.get("shared_inputs")
        if shared is None:
            rows, length = batch["input_ids"].shape
            scored = int(batch["completion_mask"][:, 1:].sum()) if triton else rows * (length - 1)
            tokens = int(batch["attention_mask"].sum())
        else:
            rows, length = shared["input_ids"].shape
            scored = shared["score_index"].numel()
            tokens = int((shared["sequence_ids"] >= 0).sum())
        work.positions += rows * length
        work.attention_pairs += rows * length * length
        work.head_positions += scored
        work.tokens += tokens
    return work


@dataclass
class EpochResult:
    seconds: float
    cpu_seconds: float
    steps: int
    step_seconds: list[float]
    tokens_computed: int
    tokens_standard: int


def run_epoch(trainer: PrefixDPOTrainer, max_steps: int = -1) -> EpochResult:
    """One ``trainer.train()`` call: an epoch over the dataset (or ``max_steps`` steps), with a fresh optimizer."""
    import torch

    computed, standard = trainer.tokens_computed, trainer.tokens_standard
    trainer.args.max_steps = max_steps
    # Trainer's RandomSampler draws from the global generator: reseeding gives every epoch of every unpacked
    # configuration the same batches, so baseline and prefix sharing pad the same groups of examples.
    torch.manual_seed(trainer.args.seed)
    gc.collect()
    gc.disable()  # a collection in the middle of one configuration's epoch would be charged to it alone
    try:
        trainer.train()
    finally:
        gc.enable()
    marks = trainer.step_timer.marks
    steps = [end - start for start, end in zip(marks, marks[1:], strict=False)]
    return EpochResult(
        seconds=marks[-1] - marks[0],
        cpu_seconds=trainer.step_timer.cpu_marks[-1] - trainer.step_timer.cpu_marks[0],
        steps=len(steps),
        step_seconds=steps,
        tokens_computed=trainer.tokens_computed - computed,
        tokens_standard=trainer.tokens_standard - standard,
    )


def tokenized_lengths(trainer: PrefixDPOTrainer) -> Lengths:
    data = trainer.train_dataset
    return Lengths(
        [len(x) for x in data["prompt_ids"]],
        [len(x) for x in data["chosen_ids"]],
        [len(x) for x in data["rejected_ids"]],
    )


def choose_packing_length(lengths: Lengths, args: argparse.Namespace) -> int:
    """One packing length for both packing configurations, so that they differ only in prefix sharing.

    ``auto`` is the paper's rule (``packing.auto_packing_length``) on the prefix-shared lengths, as the trainer's
    ``--packing_length auto`` computes it; it is raised to the longest unshared example so that every example fits
    a row in both layouts.
    """
    from packing import auto_packing_length

    longest = max(lengths.layout_lengths(share_prompt=False))
    if args.packing_length == "auto":
        length, _ = auto_packing_length(
            lengths.layout_lengths(share_prompt=True), examples_per_row=args.packing_factor
        )
    else:
        length = int(args.packing_length)
    return max(length, -(-longest // 128) * 128)


def examples_for(lengths: Lengths, args: argparse.Namespace) -> int:
    """Enough examples for about ``--tokens-per-shape`` standard-DPO tokens, in whole batches, at least two batches."""
    mean_standard = lengths.standard_tokens / len(lengths)
    wanted = max(2 * args.batch_size, round(args.tokens_per_shape / mean_standard))
    if args.examples is not None:
        wanted = args.examples
    if args.steps is not None:
        wanted = args.steps * args.batch_size
    return min(len(lengths), math.ceil(wanted / args.batch_size) * args.batch_size)


@dataclass
class Compilation:
    """What one isolated configuration cost beyond its epochs: compilation, memory, and whether it stayed compiled."""

    warmup_seconds: float = 0.0
    variants: dict[str, int] = field(default_factory=dict)
    watchdog_warnings: list[str] = field(default_factory=list)
    peak_memory_gib: float | None = None


def _result_runs(results: list[EpochResult]) -> list[dict[str, Any]]:
    return [
        {
            "seconds": r.seconds,
            "cpu_seconds": r.cpu_seconds,
            "steps": r.steps,
            "step_seconds": r.step_seconds,
            "tokens_computed": r.tokens_computed,
            "tokens_standard": r.tokens_standard,
        }
        for r in results
    ]


class ShapeRun:
    """One shape's examples, models and configurations; ``run`` times them and returns the shape's result."""

    def __init__(self, shape: Shape, tokenizer, args: argparse.Namespace, output_dir: Path, log: Callable) -> None:
        import torch

        self.shape, self.tokenizer, self.args, self.output_dir, self.log = shape, tokenizer, args, output_dir, log
        self.started = time.perf_counter()
        self._draw_examples()
        self.dims = model_dims(args, len(tokenizer))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.policy = build_model(self.dims, args.attn_implementation, args.seed, self.device, dtype)
        self.reference = build_model(self.dims, args.attn_implementation, args.seed + 1, self.device, dtype)
        self.packing_stats: dict[str, dict[str, Any]] = {}
        self.work: dict[str, Work] = {}
        self.runs: dict[str, list[EpochResult]] = {}
        self.compilation: dict[str, Compilation] = {}
        self._describe()

    def _draw_examples(self) -> None:
        """The timed examples: a representative subset of a pool calibrated to the shape."""
        self.centers, pool, self.pool_lengths = calibrate(
            self.shape, self.tokenizer, self.args.pool_size, self.args.seed, self.args.calibration_rounds
        )
        picked = representative_subset(self.pool_lengths, examples_for(self.pool_lengths, self.args), self.args.seed)
        self.dataset = pool.select(picked)
        # The calibration tokenizes as TRL does (checked against each trainer's dataset), so the packing length can
        # be chosen before any trainer exists.
        self.lengths = self.pool_lengths.subset(picked)

    def _packing_statistics(self, config: RunConfig, packing_length: int) -> dict[str, Any]:
        from packing import packing_statistics

        stats = packing_statistics(self.lengths.layout_lengths(config.prefix_sharing), packing_length)
        return {
            "packing_length": packing_length,
            "examples_per_row": stats["mean_examples_per_row"],
            "efficiency": stats["packing_efficiency"],
        }

    def trainer(self, config: RunConfig) -> PrefixDPOTrainer:
        packing_length = None
        if config.packing:
            packing_length = choose_packing_length(self.lengths, self.args)
            self.packing_stats[config.key] = self._packing_statistics(config, packing_length)
        trainer = make_trainer(
            config,
            self.dataset,
            self.policy,
            self.reference,
            self.tokenizer,
            self.args,
            packing_length,
            self.output_dir,
        )
        if tokenized_lengths(trainer) != self.lengths:
            raise RuntimeError(f"{self.shape.name}: the trainer tokenized other lengths than the calibration measured")
        return trainer

    def _describe(self) -> None:
        summary, pool = self.lengths.summary(), self.pool_lengths.summary()
        self.log(
            f"\n== {self.shape.name}: {len(self.lengths)} examples, median length {summary['median_length']:.0f} "
            f"(target {self.shape.median_length}), median ratio {summary['median_ratio']:.2f} (target "
            f"{self.shape.median_ratio}), token bound {self.lengths.bound:.3f}; pool of {len(self.pool_lengths)} "
            f"(word centers {self.centers[0]:.0f}, {self.centers[1]:.0f}): median length {pool['median_length']:.0f}, "
            f"ratio {pool['median_ratio']:.2f}"
        )

    def _log_run(self, label: str, key: str, result: EpochResult) -> None:
        self.log(
            f"   {label} {key:16s} {result.seconds:7.2f} s  {result.steps} steps  "
            f"{len(self.dataset) / result.seconds:7.2f} samples/s"
        )

    def run(self, configs: list[RunConfig], warmup_steps: int) -> dict[str, Any]:
        """Times ``configs`` and returns :meth:`result`. What finished is kept as it finishes, so ``result`` also
        describes a run cut short."""
        if self.args.isolate:
            self._run_isolated(configs, warmup_steps)
        else:
            self._run_interleaved(configs, warmup_steps)
        for key, stats in self.packing_stats.items():
            self.log(
                f"   {key}: packing length {stats['packing_length']}, {stats['examples_per_row']:.2f} examples/row, "
                f"{stats['efficiency']:.1%} non-padding"
            )
        return self.result()

    def result(self) -> dict[str, Any]:
        return {
            "shape": self._shape_record(),
            "word_centers": self.centers,
            "examples": self.lengths.summary(),
            "pool": self.pool_lengths.summary(),
            "packing": self.packing_stats,
            "work": {key: asdict(counts) for key, counts in self.work.items()},
            "runs": {key: _result_runs(results) for key, results in self.runs.items() if results},
            "compilation": {key: asdict(value) for key, value in self.compilation.items()},
            "wall_seconds": time.perf_counter() - self.started,
        }

    def _shape_record(self) -> dict[str, Any]:
        return {**asdict(self.shape), "paper": self.shape.paper}

    def _run_interleaved(self, configs: list[RunConfig], warmup_steps: int) -> None:
        trainers = {config.key: self.trainer(config) for config in configs}
        self.work = {key: count_work(trainer) for key, trainer in trainers.items()}
        if warmup_steps:
            for trainer in trainers.values():
                run_epoch(trainer, max_steps=warmup_steps)
        self.runs = {key: [] for key in trainers}
        for repeat in range(self.args.repeats):
            # Interleaved, and in a rotated order each repeat, so that drift in machine load spreads over all configs.
            order = list(trainers)
            order = order[repeat % len(order) :] + order[: repeat % len(order)]
            for key in order:
                result = run_epoch(trainers[key])
                self.runs[key].append(result)
                self._log_run(f"repeat {repeat + 1}", key, result)
        for trainer in trainers.values():
            trainer.accelerator.free_memory()

    def _run_isolated(self, configs: list[RunConfig], warmup_steps: int) -> None:
        import torch

        import flex_compile_watchdog

        cuda = torch.cuda.is_available()
        for config in configs:
            torch._dynamo.reset()
            flex_compile_watchdog.forget_warnings()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                trainer = self.trainer(config)
                self.work[config.key] = count_work(trainer)
                started = time.perf_counter()
                if warmup_steps:
                    trainer.step_timer.echo = self.log
                    run_epoch(trainer, max_steps=warmup_steps)
                    trainer.step_timer.echo = None
                warmup_seconds = time.perf_counter() - started
                self.runs[config.key] = []
                for repeat in range(self.args.repeats):
                    result = run_epoch(trainer)
                    self.runs[config.key].append(result)
                    self._log_run(f"repeat {repeat + 1}", config.key, result)
            said = [str(w.message) for w in caught if w.category is RuntimeWarning and "compil" in str(w.message)]
            cost = Compilation(
                warmup_seconds=warmup_seconds,
                variants=flex_compile_watchdog.compiled_variants(),
                watchdog_warnings=said,
                peak_memory_gib=(torch.cuda.max_memory_allocated() - resident) / 2**30 if cuda else None,
            )
            self.compilation[config.key] = cost
            self.log(
                f"   {config.key:16s} warm-up {warmup_seconds:6.1f} s, compiled variants {cost.variants}, watchdog "
                f"warnings {len(said)}" + (f", peak {cost.peak_memory_gib:.1f} GiB" if cuda else "")
            )
            trainer.accelerator.free_memory()
            del trainer


# ---------------------------------------------------------------------------------------------------------------------
# Prefix-tree shapes
# ---------------------------------------------------------------------------------------------------------------------

TREE_EXAMPLES = 48  # examples of a prefix-tree shape unless --examples says otherwise


def tree_shape_tokens(shape: TreeShape, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> dict:
    """A prefix-tree shape's examples, tokenized as the trainer tokenizes them, and their exact token bounds at the
    run's packing length (``dataset_stats.tree_statistics``, unpacked batches of ``--batch-size`` pairs)."""
    from dataset_stats import prepare, tree_statistics

    dataset = shape.generate(args.examples or TREE_EXAMPLES, args.seed)
    prepared = prepare(dataset, tokenizer, max_length=args.max_length)
    columns = [prepared[column] for column in ("prompt_ids", "chosen_ids", "rejected_ids")]
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(*columns, strict=True)]
    lengths = Lengths(*([len(ids) for ids in column] for column in columns))
    trees = tree_statistics(examples, choose_packing_length(lengths, args), args.batch_size, args.seed)
    return {"dataset": dataset, "lengths": lengths, "trees": trees}


class TreeShapeRun(ShapeRun):
    """A prefix-tree shape: its first examples in order (whole conversations), their exact tree-token bounds, and the
    configurations timed as for the paper's shapes."""

    def _draw_examples(self) -> None:
        drawn = tree_shape_tokens(self.shape, self.tokenizer, self.args)
        self.dataset, self.lengths, self.trees = drawn["dataset"], drawn["lengths"], drawn["trees"]
        self.pool_lengths, self.centers = self.lengths, None
        if measure(self.dataset, self.tokenizer) != self.lengths:
            raise RuntimeError(f"{self.shape.name}: the trainer tokenizes other lengths than measure() counts")

    def _packing_statistics(self, config: RunConfig, packing_length: int) -> dict[str, Any]:
        if not config.prefix_sharing or config.pairwise:
            return super()._packing_statistics(config, packing_length)
        rows = self.trees["rows"]["tree"]
        return {
            "packing_length": packing_length,
            "examples_per_row": len(self.dataset) / rows,
            "efficiency": self.trees["packing_efficiency"]["tree"],
        }

    def _describe(self) -> None:
        tokens = self.trees["tokens"]
        self.log(
            f"\n== {self.shape.name}: {len(self.lengths)} examples, median length "
            f"{self.lengths.summary()['median_length']:.0f}; tokens standard {tokens['standard']:,}, pairwise "
            f"{tokens['pairwise']:,}, tree: unpacked batches {tokens['tree_unpacked_batches']:,}, packed rows "
            f"{tokens['tree_packed_rows']:,}"
        )

    def _shape_record(self) -> dict[str, Any]:
        return asdict(self.shape)

    def result(self) -> dict[str, Any]:
        return {**super().result(), "trees": self.trees}
