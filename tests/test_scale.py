"""Scaling out: the accelerate configs, several processes, DeepSpeed ZeRO-3, resuming, and TRL's features.

Several processes run on the CPU over gloo: ``accelerate launch --config_file configs/ddp.yaml --num_processes 2``
with ``use_cpu`` in the training arguments (``accelerate launch --cpu`` would start a single process). How the
global batches line up with one process:

* Without packing, ``Trainer`` samples with a ``RandomSampler`` that accelerate reseeds identically everywhere
  (``SeedableRandomSampler``); ``BatchSamplerShard`` deals batch ``i`` of ``per_device`` examples to process
  ``i % W``. Two processes of 2 examples therefore train at each step the 4 examples that one process of 4 trains,
  and DDP's average of the two per-process mean losses is the mean over the 4: same losses, gradients and weights,
  to float32 rounding (the runs train with SGD, see ``SPLIT_RTOL``).
* With packing, the loss of a process is the mean over the examples of its rows, and rows hold different numbers of
  examples, so one process with 2 rows per batch is not the same thing (it averages over all examples). What is the
  same is one process accumulating gradients over 2 batches of the plan made for 2 processes: it trains batches
  ``2s`` and ``2s + 1`` at step ``s``, which the two processes train side by side, and averages the two losses as
  DDP averages their gradients (``distributed_worker.TwoProcessPlan``).

DeepSpeed runs on the CPU too, but accelerate 1.15 reports one process per rank there (``num_processes`` 1 on each
of two ranks, so data would not be sharded): ZeRO-3 is checked with one process, which still partitions the models,
wraps the reference model (and, with ``precompute_ref_log_probs``, the policy) in DeepSpeed engines and runs them.
FSDP needs GPUs (accelerate only enables it for GPU-like devices); its config is checked as accelerate reads it.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import distributed_worker as worker
import pytest
import torch
from commands import Finished, run_command
from datasets import Dataset
from dpo_harness import (
    CONTEXT_SENSITIVE_INIT,
    assert_same_step,
    conversations,
    make_trainers,
    perturbed_copy,
    relative_error,
    train_step,
)
from safetensors.torch import load_file
from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser

import train_dpo
from embedded import load_tokenizer, make_preference_dataset, tiny_model
from preference_data import normalize_schema
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
# A launch is killed when no scenario finishes for this long (the first also starts the processes: 10-20 s alone).
SCENARIO_TIMEOUT = 300
PORT_RETRIES = 3
PORT_TAKEN = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)
# Losses and weights of trainers that compute the same steps in two layouts (float32, a few SGD steps).
RUN_RTOL = 1e-5
# Runs that differ only in how a step's examples are split between processes compute the same sums in other orders and
# over other paddings: float32 rounding, a few eps per operation. Per tensor and step the gradients of 2 processes and
# of 1 were at most 6 eps apart (norm-wise, 8 steps; packed: bitwise equal), the final weights 0.3 eps. 64 eps leaves a
# factor of 10, while one example dealt to the wrong process moves the gradients by 70% (the mutation test). The
# optimizer is SGD (distributed_worker.training_args): Adam turns a near-zero gradient whose sign rounding flips into
# a full step the other way, which no tolerance derived from rounding covers.
SPLIT_RTOL = 64 * torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------------------------------
# accelerate configs
# ---------------------------------------------------------------------------------------------------------------------


def launch_args(config: str, *extra: str):
    """What ``accelerate launch --config_file configs/<config>.yaml`` makes of the file, before it starts anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{config}.yaml"), *extra, "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize(
    "config, distributed_type, processes, machines",
    [
        ("single_gpu", "NO", 1, 1),
        ("ddp", "MULTI_GPU", 8, 1),
        ("fsdp", "FSDP", 8, 1),
        ("zero3", "DEEPSPEED", 8, 1),
        ("zero3_multinode", "DEEPSPEED", 16, 2),
    ],
)
def test_config_loads(config, distributed_type, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(CONFIGS / f"{config}.yaml"))  # raises on keys accelerate does not know
    assert (loaded.distributed_type, loaded.num_processes, loaded.num_machines) == (
        distributed_type,
        processes,
        machines,
    )
    assert loaded.mixed_precision == "bf16"
    args, _ = launch_args(config)
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, "bf16")
    assert args.use_deepspeed == (distributed_type == "DEEPSPEED")
    assert args.use_fsdp == (distributed_type == "FSDP")
    assert args.multi_gpu == (distributed_type == "MULTI_GPU")


@pytest.mark.parametrize("config", ["zero3", "zero3_multinode"])
def test_zero3_config_builds_the_deepspeed_plugin(config, monkeypatch):
    """The environment accelerate's launcher hands the processes, read back by accelerate's DeepSpeedPlugin."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = launch_args(config, "--main_process_port", "29555")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    command, env = prepare_deepspeed_cmd_env(args)
    assert command is None  # the standard launcher: torchrun on each machine, no hostfile
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert (plugin.zero_stage, plugin.zero3_init_flag) == (3, True)
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if config == "zero3_multinode":
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
        assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.0.0.1:29555")


def test_fsdp_config_builds_an_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = launch_args("fsdp", "--main_process_port", "29556")
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert args.nproc_per_node == "8"


# ---------------------------------------------------------------------------------------------------------------------
# Launched runs (module fixtures: each launch is shared by the tests that read it)
# ---------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port free now, drawn outside Linux's ephemeral range (32768-60999), from which the connections of other
    processes take theirs. A concurrent launch can still take it before ours binds it: ``launch`` then retries."""
    draw = random.SystemRandom()  # not the seeded generator: concurrent test sessions would draw the same ports
    while True:
        port = draw.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return str(path)


class ScenarioRuns:
    """The scenarios of one fixture and what they wrote to ``out`` (see distributed_worker); ``failures`` says what
    happened to each scenario that did not finish."""

    def __init__(self, out: Path, num_processes: int) -> None:
        self.out = out
        self.num_processes = num_processes
        self.failures: dict[str, str] = {}
        self.outputs: list[str] = []

    @property
    def output(self) -> str:
        return "\n".join(self.outputs)

    def finished(self, scenario: str) -> bool:
        return all((self.out / f"{scenario}.rank{rank}.json").exists() for rank in range(self.num_processes))

    def ranks(self, scenario: str) -> list[dict[str, Any]]:
        assert scenario not in self.failures, self.failures[scenario]
        assert self.finished(scenario), f"scenario {scenario} was not run"
        return [
            json.loads((self.out / f"{scenario}.rank{rank}.json").read_text()) for rank in range(self.num_processes)
        ]

    def tensors(self, scenario: str, kind: str) -> dict[str, torch.Tensor]:
        """What process 0 saved: ``weights`` (final) or ``gradients`` (every step's, stacked)."""
        self.ranks(scenario)
        return torch.load(self.out / f"{scenario}.{kind}.pt")


def excerpt(finished: Finished) -> str:
    """Of a launch that failed, its first traceback (the failure, rather than the launcher's report of it); of one
    that hung, its end (the processes' stacks, see ``--stack-dump-after``)."""
    lines = [line for line in finished.output.splitlines() if "Warning" not in line and "warnings.warn" not in line]
    first = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
    if finished.hung is not None or first is None:
        first = max(0, len(lines) - 80)
    return "\n".join(lines[first : first + 80])


def launch(config: str, num_processes: int, scenarios: list[str], model: str, out: Path) -> ScenarioRuns:
    """Runs ``distributed_worker.py``'s scenarios under ``accelerate launch --config_file configs/<config>.yaml``.

    Does not raise: a test reading a scenario that did not finish fails saying why. A launch that fails or hangs in a
    scenario (none finishes for ``SCENARIO_TIMEOUT`` seconds) is killed, and the scenarios after that one go to a new
    launch: one failure fails the tests of its scenario (and of those that need it), not all. A launch that fails
    before any scenario because its port was taken (between choosing it and binding it) is retried on another port.
    """
    runs = ScenarioRuns(out, num_processes)
    pending, port_retries, launches_without_progress = list(scenarios), PORT_RETRIES, 0
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    while pending:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
            "--num_processes", str(num_processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
            str(REPO / "tests" / "distributed_worker.py"), "--model", model, "--out", str(out),
            "--stack-dump-after", str(SCENARIO_TIMEOUT - 30), *pending,
        ]  # fmt: skip
        what = f"`accelerate launch --config_file configs/{config}.yaml` on {num_processes} process(es) of {pending}"
        finished = run_command(
            command, what=what, timeout=SCENARIO_TIMEOUT, cwd=out, env=env, progress=worker.FINISHED
        )
        runs.outputs.append(finished.output)
        (out / f"launch-{len(runs.outputs)}.log").write_text(finished.output)
        failed = next((scenario for scenario in pending if not runs.finished(scenario)), None)
        if failed is None:
            break
        progressed = failed != pending[0]
        if not progressed and PORT_TAKEN.search(finished.output) and port_retries:
            port_retries -= 1
            continue
        why = finished.why or "ended without writing its results"
        runs.failures[failed] = f"scenario {failed} did not finish: {what} {why}; it printed:\n{excerpt(finished)}"
        pending = pending[pending.index(failed) + 1 :]
        launches_without_progress = 0 if progressed else launches_without_progress + 1
        if launches_without_progress == 2:
            for scenario in pending:
                runs.failures[scenario] = f"scenario {scenario} was not run: two launches in a row finished nothing"
            break
    return runs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, model_dir) -> ScenarioRuns:
    """configs/ddp.yaml on 2 CPU processes. ``shared_misdealt`` reads what ``shared`` trained, so it comes after it."""
    out = tmp_path_factory.mktemp("two-processes")
    scenarios = ["cli", "shared", "shared_misdealt", "shared_resume", "packed", "packed_resume", "streamed_packed"]
    return launch("ddp", 2, scenarios, model_dir, out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_dir) -> ScenarioRuns:
    """The single-process references, run in this process."""
    out = tmp_path_factory.mktemp("one-process")
    names = ["shared_reference", "shared_reference_resume", "packed_reference", "packed_reference_resume"]
    for name in names:
        worker.run_scenario(name, model_dir, out)
    return ScenarioRuns(out, 1)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, model_dir) -> ScenarioRuns:
    """configs/zero3.yaml on one CPU process (see the module docstring)."""
    out = tmp_path_factory.mktemp("zero3")
    return launch("zero3", 1, ["zero3_reference_model", "zero3_precompute"], model_dir, out)


def by_step(ranks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """{step: [the micro-batch records of that step, rank by rank (in order within a rank)]}."""
    steps: dict[int, list[dict[str, Any]]] = {}
    for result in ranks:
        for record in result["records"]:
            steps.setdefault(record["step"], []).append(record)
    return dict(sorted(steps.items()))


def assert_close(actual: float, expected: float, rtol: float = RUN_RTOL) -> None:
    assert abs(actual - expected) <= rtol * abs(expected), (actual, expected)


def initial_weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def assert_same_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every step's gradient, tensor by tensor, within float32 rounding (``SPLIT_RTOL``; norm-wise, since entries
    that are zero up to rounding have no relative error to speak of)."""
    assert actual.keys() == expected.keys()
    for name, steps in expected.items():
        assert len(actual[name]) == len(steps), name
        for step, (gradient, reference) in enumerate(zip(actual[name], steps, strict=True), start=1):
            error = relative_error(gradient, reference)
            assert error <= SPLIT_RTOL, f"step {step}: the gradient of {name} is {error:.1e} off (relative)"


def assert_same_weights(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> None:
    """The final weights within float32 rounding of the reference's, each tensor having moved in training by more
    than 8 times that (else agreeing would not show that it trained the same): the norms' weights by 9.5 to 23 times,
    the matrices by far more."""
    assert actual.keys() == expected.keys() <= initial.keys()
    for name, reference in expected.items():
        assert relative_error(actual[name], reference) <= SPLIT_RTOL, name
        assert relative_error(reference, initial[name]) > 8 * SPLIT_RTOL, f"{name} barely moved in training"


def assert_same_global_batches(two: dict[int, list[dict[str, Any]]], one: dict[int, list[dict[str, Any]]]) -> None:
    """At each step the two processes together train the examples of the reference's step, in order, and the mean of
    their losses (what DDP's gradient average is the gradient of) is the reference's loss."""
    assert two.keys() == one.keys()
    for step, records in two.items():
        (reference,) = one[step]
        assert [index for record in records for index in record["examples"]] == reference["examples"], step
        assert_close(sum(record["loss"] for record in records) / len(records), reference["loss"], rtol=SPLIT_RTOL)


def test_cli_on_two_processes(two_processes):
    """``train_dpo.py`` itself with prefix sharing, as ``accelerate launch --config_file configs/ddp.yaml`` runs it."""
    ranks = two_processes.ranks("cli")
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert "tokens standard DPO would compute" in two_processes.output
    assert (two_processes.out / "cli" / "model.safetensors").exists()


def assert_same_training(two_processes, one_process, scenario: str, model_dir) -> None:
    """Every step's gradients, then the final weights, of a two-process scenario against its one-process reference."""
    reference = f"{scenario}_reference"
    assert_same_gradients(two_processes.tensors(scenario, "gradients"), one_process.tensors(reference, "gradients"))
    assert_same_weights(
        two_processes.tensors(scenario, "weights"),
        one_process.tensors(reference, "weights"),
        initial_weights(model_dir),
    )


def test_two_processes_train_the_global_batches_of_one(two_processes, one_process, model_dir):
    """2 processes x 2 examples against 1 process x 4 (prefix sharing, no packing): at every step the same examples,
    loss and gradient (as the optimizer receives it, after DDP's average), and in the end the same weights."""
    ranks = two_processes.ranks("shared")
    assert [rank["distributed_type"] for rank in ranks] == ["DistributedType.MULTI_CPU"] * 2
    two, one = by_step(ranks), by_step(one_process.ranks("shared_reference"))
    assert len(two) == 8
    assert_same_global_batches(two, one)
    assert_same_training(two_processes, one_process, "shared", model_dir)


def test_an_example_dealt_to_the_wrong_process_fails_the_comparison(two_processes, one_process):
    """Mutation: in ``shared_misdealt`` process 1 trains at step 1 an example that belongs to process 0 at step 2,
    and records the dataset position it drew (distributed_worker.misdealt). The recorded examples cannot tell, nor can
    the loss (at step 1 the policy is the reference: every example's loss is log 2); the gradients must."""
    misdealt = by_step(two_processes.ranks("shared_misdealt"))
    reference = by_step(one_process.ranks("shared_reference"))
    assert list(misdealt) == [1]
    assert_same_global_batches(misdealt, {1: reference[1]})
    gradients = one_process.tensors("shared_reference", "gradients")
    with pytest.raises(AssertionError, match="step 1: the gradient of"):
        assert_same_gradients(
            two_processes.tensors("shared_misdealt", "gradients"),
            {name: steps[:1] for name, steps in gradients.items()},
        )


def test_packed_two_processes_match_accumulating_one(two_processes, one_process, model_dir):
    """Packing on 2 processes x 1 row against 1 process accumulating 2 batches of the same plan (module docstring): at
    every step the same rows, losses and gradient, and in the end the same weights."""
    two, one = by_step(two_processes.ranks("packed")), by_step(one_process.ranks("packed_reference"))
    assert two.keys() == one.keys()
    for step, records in two.items():
        assert [record["examples"] for record in records] == [record["examples"] for record in one[step]], step
        for record, reference in zip(records, one[step], strict=True):
            assert_close(record["loss"], reference["loss"], rtol=SPLIT_RTOL)
    assert_same_training(two_processes, one_process, "packed", model_dir)


@pytest.mark.parametrize("scenario", ["shared", "packed"])
def test_every_example_once_per_epoch_on_two_processes(two_processes, scenario):
    ranks = two_processes.ranks(scenario)
    steps_per_epoch = ranks[0]["steps_per_epoch"]
    epochs: list[list[int]] = [[], []]
    for step, records in by_step(ranks).items():
        epochs[(step - 1) // steps_per_epoch] += [index for record in records for index in record["examples"]]
    for seen in epochs:
        assert sorted(seen) == list(range(worker.NUM_EXAMPLES))
    assert epochs[0] != epochs[1], "the second epoch repeated the order of the first: set_epoch did not arrive"


def test_streamed_packing_on_two_processes(two_processes):
    """A streamed train set packed on two processes: both take every step, and every example comes once per epoch
    (an epoch ends on a step boundary, since each window is planned as a multiple of two batches)."""
    ranks = two_processes.ranks("streamed_packed")
    steps = by_step(ranks)
    assert list(steps) == list(range(1, worker.STREAMED_STEPS + 1))
    assert all(len(records) == 2 for records in steps.values())  # one micro-batch per process and step
    seen = [index for records in steps.values() for record in records for index in record["examples"]]
    assert len(seen) > worker.NUM_EXAMPLES, "fewer steps than an epoch: raise STREAMED_STEPS"
    epoch_ends = list(itertools.accumulate(sum(len(r["examples"]) for r in records) for records in steps.values()))
    assert worker.NUM_EXAMPLES in epoch_ends
    first, second = seen[: worker.NUM_EXAMPLES], seen[worker.NUM_EXAMPLES :]
    assert sorted(first) == list(range(worker.NUM_EXAMPLES))
    assert len(set(second)) == len(second) and second != first[: len(second)]


def assert_resumed_like_uninterrupted(uninterrupted: list[dict[str, Any]], resumed: list[dict[str, Any]]) -> None:
    checkpoint = uninterrupted[0]["checkpoint_step"]
    expected = {step: records for step, records in by_step(uninterrupted).items() if step > checkpoint}
    actual = by_step(resumed)
    assert actual.keys() == expected.keys() and len(actual) >= 2
    for step, records in expected.items():
        assert [record["examples"] for record in actual[step]] == [record["examples"] for record in records], step
        for record, reference in zip(actual[step], records, strict=True):
            assert_close(record["loss"], reference["loss"], rtol=1e-6)


@pytest.mark.parametrize("scenario", ["shared", "packed"])
def test_resume_mid_epoch_on_two_processes(two_processes, scenario):
    """Resumed two steps into the second epoch, the run goes on with the batches and losses it would have had."""
    assert_resumed_like_uninterrupted(two_processes.ranks(scenario), two_processes.ranks(f"{scenario}_resume"))


@pytest.mark.parametrize("scenario", ["shared_reference", "packed_reference"])
def test_resume_mid_epoch_on_one_process(one_process, scenario):
    assert_resumed_like_uninterrupted(one_process.ranks(scenario), one_process.ranks(f"{scenario}_resume"))


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# ---------------------------------------------------------------------------------------------------------------------


def test_zero3_reference_model_runs_the_shared_forward(zero3, one_process):
    """TRL wraps the reference model in a DeepSpeed engine before our trainer installs the shared forward; the forward
    goes on the module the engine wraps (``unwrap_model``), which the engine calls."""
    (result,) = zero3.ranks("zero3_reference_model")
    assert result["distributed_type"] == "DistributedType.DEEPSPEED"
    assert result["reference_wrapper"] == "DeepSpeedEngine" and result["reference_shares_prefix"]
    # 4 examples per step: 4 rows in the shared layout (TRL's standard layout would have 8).
    assert result["policy_rows"] == result["reference_rows"] == [4] * result["steps_per_epoch"]
    # The first epoch of the single-process run without DeepSpeed: same examples and losses.
    reference = by_step(one_process.ranks("shared_reference"))
    for record in result["records"]:
        (expected,) = reference[record["step"]]
        assert record["examples"] == expected["examples"]
        assert_close(record["loss"], expected["loss"])


def test_zero3_precompute_ref_log_probs_runs_the_shared_forward(zero3, tmp_path, model_dir):
    """With ``precompute_ref_log_probs`` (packing on) TRL runs the reference pass through a DeepSpeed engine around the
    policy, built after our trainer installed the shared forward on it."""
    (result,) = zero3.ranks("zero3_precompute")
    assert result["precompute_engine"] == "DeepSpeedEngine" and result["precompute_engine_shares_prefix"]
    assert result["reference_rows"] == []  # no reference model
    steps = len(result["records"])
    precompute_rows, training_rows = result["policy_rows"][:-steps], result["policy_rows"][-steps:]
    # Packed rows of the shared layout: at most one row per example, fewer in all (TRL's layout: two per example).
    assert sum(precompute_rows) < worker.NUM_EXAMPLES
    for rows, record in zip(training_rows, result["records"], strict=True):
        assert rows <= len(record["examples"])
    expected = worker.run_scenario("zero3_precompute", model_dir, tmp_path)  # the same run without DeepSpeed
    assert relative_error(torch.tensor(result["ref_chosen_logps"]), torch.tensor(expected["ref_chosen_logps"])) < 1e-6
    assert [record["examples"] for record in result["records"]] == [r["examples"] for r in expected["records"]]
    for record, reference in zip(result["records"], expected["records"], strict=True):
        assert_close(record["loss"], reference["loss"])


# ---------------------------------------------------------------------------------------------------------------------
# PEFT, gradient checkpointing, sync_ref_model, bf16, wandb
# ---------------------------------------------------------------------------------------------------------------------


def short_conversations(num_examples: int = 4) -> Dataset:
    """Multi-turn conversations of 60 to 140 tokens (dpo_harness's are longer, and slower to train on)."""
    return normalize_schema(
        make_preference_dataset(num_examples, seed=0, prompt_words=(20, 80), response_words=(3, 20))
    )


def enable_checkpointing(trainer: DPOTrainer) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Turns activation checkpointing on as ``Trainer.train`` does; counts the forwards of the first layer's attention
    (a module inside the checkpointed layer: the layer's own hooks run outside the checkpoint, so its recomputation
    would not reach them)."""
    trainer.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
    )
    calls: list[int] = []
    handle = trainer.model.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_gradient_checkpointing_is_exact(tmp_path):
    """Non-reentrant activation checkpointing without PEFT: loss, log-probs, gradients and metrics against
    trl.DPOTrainer with the same setup (with LoRA: tests/test_peft.py)."""
    config = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    trl_trainer, ours = make_trainers(conversations(), tmp_path=tmp_path, gradient_checkpointing=True, **config)
    (trl_calls, trl_handle), (our_calls, our_handle) = enable_checkpointing(trl_trainer), enable_checkpointing(ours)
    trl_step, our_step = train_step(trl_trainer), train_step(ours)
    trl_handle.remove()
    our_handle.remove()
    assert "shared_inputs" in our_step.batch
    assert_same_step(our_step, trl_step)
    # The policy forward, its recomputation in the backward, and the harness's no-grad forward of the policy's
    # log-probs (the reference model is another module); without the recomputation it would be 2.
    assert len(our_calls) == len(trl_calls) == 3


class LossRecorder:
    """Records the training loss of every step (as a float, unrounded)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.__dict__.setdefault("losses", []).append(loss.item())
        return loss


class RecordingTRL(LossRecorder, DPOTrainer):
    pass


class RecordingOurs(LossRecorder, PrefixDPOTrainer):
    pass


def train_pair(
    tmp_path: Path, steps: int, before_training: Callable[[DPOTrainer], None] | None = None, **config: Any
) -> tuple[DPOTrainer, PrefixDPOTrainer]:
    """Trains trl.DPOTrainer and PrefixDPOTrainer ``steps`` steps on the same batches in the same order."""
    policy = tiny_model("llama", seed=0, initializer_range=CONTEXT_SENSITIVE_INIT)
    reference = perturbed_copy(policy)
    common = dict(
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=steps,
        # SGD: the update is linear in the gradient, so weights stay as close as the gradients (Adam's first step
        # moves a weight by lr * sign(g) whatever g's size: a sign that rounding flips costs 2 * lr).
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        max_length=None,
        **{"bf16": False, **config},
    )
    trainers = []
    for trainer_cls, config_cls, extra in (
        (RecordingTRL, DPOConfig, {}),
        (RecordingOurs, PrefixDPOConfig, {"prefix_sharing": True}),
    ):
        trainer = trainer_cls(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **common, **extra),
            train_dataset=short_conversations(),
            processing_class=load_tokenizer(),
        )
        if before_training is not None:
            before_training(trainer)
        trainer.train()
        trainers.append(trainer)
    return trainers[0], trainers[1]


def test_sync_ref_model(tmp_path):
    """TR-DPO: the reference model is mixed with the policy after every step; our reference keeps its shared forward
    through the syncs, and losses and synced reference weights follow trl.DPOTrainer's."""
    initial = perturbed_copy(tiny_model("llama", seed=0, initializer_range=CONTEXT_SENSITIVE_INIT))
    trl_trainer, ours = train_pair(tmp_path, 2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    assert len(ours.losses) == 2
    for loss, expected in zip(ours.losses, trl_trainer.losses, strict=True):
        assert_close(loss, expected)
    reference = ours.accelerator.unwrap_model(ours.ref_model)
    assert reference._has_shared_forward
    trl_reference = dict(trl_trainer.accelerator.unwrap_model(trl_trainer.ref_model).named_parameters())
    for name, parameter in reference.named_parameters():
        assert relative_error(parameter, trl_reference[name]) <= RUN_RTOL, name
    moved = relative_error(reference.get_parameter("lm_head.weight"), initial.get_parameter("lm_head.weight"))
    assert moved > 1e-4, "the reference model was not synced"


def test_bf16_autocast_on_cpu(tmp_path):
    """``--use_cpu --bf16``: the forwards run under bf16 autocast and the losses follow trl.DPOTrainer's to bf16
    precision (both layouts round differently, so not to float32 precision)."""
    dtypes: dict[str, list[torch.dtype]] = {}

    def record_dtypes(trainer: DPOTrainer) -> None:
        projection = trainer.model.model.layers[0].self_attn.q_proj
        seen = dtypes.setdefault(type(trainer).__name__, [])
        projection.register_forward_hook(lambda module, args, output: seen.append(output.dtype))

    trl_trainer, ours = train_pair(tmp_path, 2, before_training=record_dtypes, bf16=True)
    # Per step: the policy forward (the reference model is another module).
    assert dtypes == {"RecordingTRL": [torch.bfloat16] * 2, "RecordingOurs": [torch.bfloat16] * 2}
    for loss, expected in zip(ours.losses, trl_trainer.losses, strict=True):
        assert_close(loss, expected, rtol=5e-3)  # measured 9.6e-4; positions not restarted move it by 0.28


def test_cli_with_lora_checkpointing_bf16_and_wandb(tmp_path, monkeypatch):
    """``--use_peft --gradient_checkpointing --use_cpu --bf16 --report_to wandb`` (wandb offline) with prefix sharing
    and packing: the run trains, saves the adapter and logs the prefix-sharing metrics to wandb."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    data = tmp_path / "pairs.jsonl"
    worker.preference_data().to_json(str(data))
    model_path = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_path)
    load_tokenizer().save_pretrained(model_path)
    argv = [
        "--model_name_or_path", str(model_path), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
        "--prefix_sharing", "--enable_packing", "--packing_length", "512", "--per_device_train_batch_size", "2",
        "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
        "--use_peft", "--lora_r", "8", "--lora_target_modules", "all-linear", "--gradient_checkpointing", "True",
        "--use_cpu", "--bf16", "--report_to", "wandb", "--run_name", "prefix-sharing-test",
    ]  # fmt: skip
    script_args, training_args, model_args = TrlParser(
        (ScriptArguments, PrefixDPOConfig, ModelConfig)
    ).parse_args_and_config(args=argv)
    assert training_args.bf16 and training_args.use_cpu and model_args.use_peft
    import wandb
    from wandb.sdk.wandb_run import Run

    logged: list[dict[str, Any]] = []
    log = Run.log

    def recording_log(run: Run, data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        logged.append(data)
        log(run, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", recording_log)
    try:
        train_dpo.main(script_args, training_args, model_args)
    finally:
        wandb.finish()
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    keys = {key for data in logged for key in data}
    for key in ("train/loss", "train/tokens/computed", "train/tokens/saved_share", "train/packing/efficiency"):
        assert key in keys, key
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # the offline run, to `wandb sync` later
