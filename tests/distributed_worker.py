"""Training runs that record what each process trained on, for the multi-process tests in ``test_scale.py``.

Run under ``accelerate launch`` (or ``python`` for one process); each scenario writes ``OUT/<scenario>.rank<r>.json``
(and, from process 0, the final weights to ``OUT/<scenario>.weights.pt`` and the gradients of every optimizer step to
``OUT/<scenario>.gradients.pt``)::

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/ddp.yaml --num_processes 2 \\
        --mixed_precision no tests/distributed_worker.py --model DIR --out OUT shared shared_resume ...

The tests import :func:`run_scenario` to run the single-process references in their own process.

Every micro-batch a process trains on is recorded as the dataset indices of its examples, recovered from the batch
itself (the tokens of each chosen row), with the process's loss on it. Scenarios:

* ``shared``/``packed``: two epochs of prefix sharing, without and with packing, saving one checkpoint two steps
  into the second epoch; ``<scenario>_resume`` resumes from it in a fresh trainer.
* ``shared_reference``/``packed_reference`` (one process): the same global batches as ``shared``/``packed`` on two
  processes; they save and resume like them.
* ``shared_misdealt``: the first step of ``shared`` with one example dealt to the wrong process (:func:`misdealt`),
  for the tests to show that their comparison catches it.
* ``zero3_reference_model``/``zero3_precompute``: for DeepSpeed ZeRO-3. They also record the number of rows of every
  backbone forward: ``B`` rows is the prefix-shared layout of ``B`` examples, ``2B`` TRL's standard one.
* ``streamed_packed``: a streamed train set, packed window by window (``packing.PackedStream``), for
  ``STREAMED_STEPS`` steps: more than one epoch.
* ``cli``: ``train_dpo.main`` on the command line arguments a user would give.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embedded import load_tokenizer, make_preference_dataset  # noqa: E402
from packing import PackedBatchSampler  # noqa: E402
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer  # noqa: E402
from shared_layout import RankBatches  # noqa: E402

NUM_EXAMPLES = 16
PACKING_LENGTH = 144
# The checkpoint to resume from is this many steps into the second epoch: the resumed run then skips batches of an
# epoch other than the first, whose order only a correctly set epoch reproduces.
RESUME_STEPS_INTO_SECOND_EPOCH = 2
COLLECTIVE_TIMEOUT = 60
STREAMED_STEPS = 10
# What a process prints after each scenario, followed by its name: the launcher's sign of progress.
FINISHED = "distributed_worker finished scenario"
# With SGD (see `training_args`): the loss falls from 0.69 to about 0.45 over the two epochs.
LEARNING_RATE = 0.01


def preference_data(num_examples: int = NUM_EXAMPLES) -> Dataset:
    """Short conversations (40 to 120 tokens), so that two epochs on two CPU processes take seconds."""
    return make_preference_dataset(num_examples, seed=0, prompt_words=(10, 60), response_words=(3, 20))


class RecordingTrainer(PrefixDPOTrainer):
    """Records, per training micro-batch, its step, the dataset indices of its examples and this process's loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.records: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)
        examples = list(self.train_dataset)  # in dataset order, also when streamed
        self._index_of = {tuple(e["prompt_ids"] + e["chosen_ids"]): index for index, e in enumerate(examples)}
        if len(self._index_of) != len(examples):
            raise ValueError("Two examples share prompt and chosen response: they cannot be told apart.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            chosen_rows = len(inputs["input_ids"]) // 2
            rows = zip(inputs["input_ids"][:chosen_rows], inputs["attention_mask"][:chosen_rows], strict=True)
            examples = [self._index_of[tuple(ids[mask.bool()].tolist())] for ids, mask in rows]
            value = loss[0] if return_outputs else loss
            self.records.append({"step": self.state.global_step + 1, "examples": examples, "loss": value.item()})
        return loss


class GradientRecorder(TrainerCallback):
    """The gradients of every optimizer step, as the optimizer receives them: after gradient accumulation and DDP's
    all-reduce (averaged over the processes, so the same on each)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        )

    def stacked(self) -> dict[str, torch.Tensor]:
        """{parameter: its gradients, step by step}."""
        return {name: torch.stack([step[name] for step in self.steps]) for name in self.steps[0]}


class TwoProcessPlan(RecordingTrainer):
    """One process walking the packed batches planned for two processes, in order.

    With two processes, process ``r`` trains batch ``2s + r`` at step ``s``; one process accumulating gradients over
    two batches trains batches ``2s`` and ``2s + 1`` at step ``s``: the same examples, losses and averaged gradient.
    """

    def _packed_batches(self, dataset, rows_per_batch: int, shuffle: bool) -> RankBatches:
        batches = PackedBatchSampler(
            self._example_sizes(dataset),
            self.args.packing_length,
            rows_per_batch=rows_per_batch,
            num_processes=2,
            shuffle=shuffle,
            seed=self.args.seed,
        )
        return RankBatches(batches, 1, 0)


PACKED = {"enable_packing": True, "packing_length": str(PACKING_LENGTH), "per_device_train_batch_size": 1}
SCENARIOS: dict[str, tuple[dict[str, Any], type[RecordingTrainer]]] = {
    "shared": ({"save_strategy": "steps"}, RecordingTrainer),
    "packed": ({**PACKED, "save_strategy": "steps"}, RecordingTrainer),
    "shared_reference": ({"per_device_train_batch_size": 4, "save_strategy": "steps"}, RecordingTrainer),
    "packed_reference": ({**PACKED, "gradient_accumulation_steps": 2, "save_strategy": "steps"}, TwoProcessPlan),
    # Mutation of ``shared`` (see `misdealt`), one step.
    "shared_misdealt": ({"max_steps": 1}, RecordingTrainer),
    "zero3_reference_model": ({"num_train_epochs": 1, "per_device_train_batch_size": 4}, RecordingTrainer),
    "zero3_precompute": (
        {**PACKED, "num_train_epochs": 1, "per_device_train_batch_size": 2, "precompute_ref_log_probs": True},
        RecordingTrainer,
    ),
}
RESUME_SUFFIX = "_resume"


def training_args(output_dir: Path, **overrides: Any) -> PrefixDPOConfig:
    config: dict[str, Any] = dict(
        output_dir=str(output_dir),
        prefix_sharing=True,
        per_device_train_batch_size=2,
        num_train_epochs=2,
        # SGD with momentum, unclipped: the update is linear in the gradient, so runs whose gradients differ by
        # rounding stay that close (Adam's first steps move a weight by about lr * sign(g) whatever g's size, so a
        # near-zero gradient whose sign flips with the summation order moves it by 2 * lr). Momentum keeps an
        # optimizer state for the resumed runs to restore; no clipping keeps the gradient's scale visible.
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=LEARNING_RATE,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    config.update(overrides)
    return PrefixDPOConfig(**config)


def record_backbone_rows(model: torch.nn.Module, rows: list[int]) -> None:
    """Appends the number of rows of every forward of ``model``'s backbone to ``rows``."""
    backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model

    def hook(module, args, kwargs):
        rows.append(len(kwargs["input_ids"]))

    backbone.register_forward_pre_hook(hook, with_kwargs=True)


def misdealt(dataset: Dataset, out_dir: Path) -> Dataset:
    """Process 1's data in ``shared_misdealt``: the first example it trained in ``shared`` (run before, same folder)
    swapped with one that process 0 trained at step 2. At step 1 process 1 then trains an example that belongs to
    another process and step, and records the position it drew, which is the right one: only the losses and gradients
    can tell."""
    records = [json.loads((out_dir / f"shared.rank{rank}.json").read_text())["records"] for rank in (0, 1)]
    drawn = next(record for record in records[1] if record["step"] == 1)["examples"][0]
    other = next(record for record in records[0] if record["step"] == 2)["examples"][0]
    order = list(range(len(dataset)))
    order[drawn], order[other] = other, drawn
    return dataset.select(order)


def run_scenario(name: str, model_path: str, out_dir: Path) -> dict[str, Any]:
    """Trains one scenario and writes (and returns) what this process recorded."""
    from transformers import AutoModelForCausalLM

    base = name.removesuffix(RESUME_SUFFIX)
    overrides, trainer_cls = SCENARIOS[base]
    if name != base:
        overrides = {**overrides, "save_strategy": "no"}
    args = training_args(out_dir / name, **overrides)
    # Loaded after the training arguments: under ZeRO-3 they make from_pretrained build a partitioned model.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    policy_rows: list[int] = []
    record_backbone_rows(model, policy_rows)
    dataset = preference_data()
    if name == "shared_misdealt" and args.process_index == 1:
        dataset = misdealt(dataset, out_dir)
    gradients = GradientRecorder()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, processing_class=load_tokenizer(), callbacks=[gradients]
    )
    steps_per_epoch = len(trainer.get_train_dataloader()) // args.gradient_accumulation_steps
    checkpoint = steps_per_epoch + RESUME_STEPS_INTO_SECOND_EPOCH
    trainer.args.save_steps = checkpoint
    reference_rows: list[int] = []
    if trainer.ref_model is not None:
        record_backbone_rows(trainer.accelerator.unwrap_model(trainer.ref_model), reference_rows)
    resume = str(out_dir / base / f"checkpoint-{checkpoint}") if name != base else None
    trainer.train(resume_from_checkpoint=resume)

    result: dict[str, Any] = {
        "world_size": args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "steps_per_epoch": steps_per_epoch,
        "checkpoint_step": checkpoint,
        "records": trainer.records,
        "policy_rows": policy_rows,
        "reference_rows": reference_rows,
    }
    if trainer.ref_model is not None:
        result["reference_wrapper"] = type(trainer.ref_model).__name__
        result["reference_shares_prefix"] = getattr(
            trainer.accelerator.unwrap_model(trainer.ref_model), "_has_shared_forward", False
        )
    if args.precompute_ref_log_probs:
        result["ref_chosen_logps"] = list(trainer.train_dataset["ref_chosen_logps"])
        engine = getattr(trainer, "_precompute_engine", None)
        result["precompute_engine"] = None if engine is None else type(engine).__name__
        result["precompute_engine_shares_prefix"] = getattr(
            getattr(engine, "module", None), "_has_shared_forward", False
        )
    if trainer.accelerator.distributed_type != "DEEPSPEED" and trainer.accelerator.is_main_process:
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        torch.save({key: value.detach().clone() for key, value in weights.items()}, out_dir / f"{name}.weights.pt")
        torch.save(gradients.stacked(), out_dir / f"{name}.gradients.pt")
    (out_dir / f"{name}.rank{args.process_index}.json").write_text(json.dumps(result))
    return result


def run_streamed(model_path: str, out_dir: Path) -> None:
    """``streamed_packed``: each process records the dataset indices of every batch it trained on."""
    from transformers import AutoModelForCausalLM

    args = training_args(
        out_dir / "streamed_packed", **PACKED, max_steps=STREAMED_STEPS, packing_window=NUM_EXAMPLES // 2
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    dataset = preference_data().to_iterable_dataset()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, processing_class=load_tokenizer())
    trainer.train()
    result = {"world_size": args.world_size, "records": trainer.records}
    (out_dir / f"streamed_packed.rank{args.process_index}.json").write_text(json.dumps(result))


def run_cli(model_path: str, out_dir: Path) -> None:
    """``train_dpo.py`` as a user runs it (minus the launcher): a local model and a local .jsonl dataset."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    import train_dpo

    data = out_dir / "pairs.jsonl"
    argv = [
        "--model_name_or_path", model_path, "--dataset_name", str(data), "--output_dir", str(out_dir / "cli"),
        "--prefix_sharing", "--per_device_train_batch_size", "2", "--max_steps", "2", "--use_cpu", "--bf16", "False",
        "--gradient_checkpointing", "False", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--logging_steps", "1",
    ]  # fmt: skip
    parser = TrlParser((ScriptArguments, PrefixDPOConfig, ModelConfig))
    script_args, training_args_, model_args = parser.parse_args_and_config(args=argv)
    with training_args_.main_process_first(desc="writing the dataset"):
        if training_args_.process_index == 0 and not data.exists():
            preference_data().to_json(str(data))
    # Trainer.end (train_dpo.main's last call) destroys the process group; the scenarios after this one in the same
    # launch need it, and starting a new one on the same port races between the processes.
    with mock.patch.object(train_dpo.PrefixDPOTrainer, "end", lambda self: None):
        train_dpo.main(script_args, training_args_, model_args)
    (out_dir / f"cli.rank{training_args_.process_index}.json").write_text(
        json.dumps({"world_size": training_args_.world_size})
    )


def skip_deepspeed_shm_kernel() -> None:
    """DeepSpeed compiles its shared-memory all-reduce (a C++ extension) the first time it starts on a CPU, which takes
    over a minute on 2 cores; without it DeepSpeed all-reduces through torch.distributed (gloo), the same sums."""
    # By its module path: the attribute `deepspeed.comm.torch` is PyTorch, imported by `deepspeed.comm`.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def start_process_group() -> None:
    """The gloo group of a multi-process CPU run, before accelerate starts it with a 30-minute timeout: a collective
    that cannot complete (processes disagreeing on a shape) then fails in a minute instead of hanging."""
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed:
        skip_deepspeed_shm_kernel()
    if multi_process and not deepspeed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved tiny model with its tokenizer")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--stack-dump-after",
        type=float,
        default=0,
        help="print every thread's stack when one scenario (the first: with the start) runs this many seconds",
    )
    choices = [*SCENARIOS, *(s + RESUME_SUFFIX for s in SCENARIOS), "cli", "streamed_packed"]
    parser.add_argument("scenarios", nargs="+", choices=choices)
    cli = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    cli.out.mkdir(parents=True, exist_ok=True)

    def watch() -> None:
        """A scenario that hangs shows where: the launch is killed without a traceback."""
        if cli.stack_dump_after:
            faulthandler.dump_traceback_later(cli.stack_dump_after)

    watch()
    start_process_group()
    for name in cli.scenarios:
        if name == "cli":
            run_cli(cli.model, cli.out)
        elif name == "streamed_packed":
            run_streamed(cli.model, cli.out)
        else:
            run_scenario(name, cli.model, cli.out)
        if torch.distributed.is_initialized():  # every process's results are written before the next scenario reads
            torch.distributed.barrier()
        print(f"{FINISHED} {name}", flush=True)
        watch()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
