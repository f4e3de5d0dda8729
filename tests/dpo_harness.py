"""Runs TRL's DPOTrainer and PrefixDPOTrainer on the same examples and collects what must agree.

Everything is float32 on CPU. The reference model is the policy with a few percent of noise on every weight, as in
real DPO where the policy starts from the reference: the loss is not the trivial log(2), and the log-ratios stay of
the size training sees (two unrelated random models give log-ratios in the hundreds, whose cancellation in the loss
gradient would measure float32 rounding rather than the layout). Weights are drawn 10x wider than the default
initializer range: at the default a random model barely uses its context, so wrong positions moved the sequence
log-probs by only 6e-6, below the tolerance (see test_comparison_fails_on_a_wrong_layout).
"""

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig
from transformers import Trainer
from trl import DPOConfig, DPOTrainer

import collators
from embedded import load_tokenizer, make_preference_dataset, tiny_model
from preference_data import normalize_schema
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

CONTEXT_SENSITIVE_INIT = 0.2
# Relative error allowed between the two trainers (float32, different summation orders in attention).
RTOL = 1e-5
# Logged values that only one of the trainers has, or that are timings.
NOT_COMPARED = ("runtime", "per_second", "tokens/", "packing/")


@dataclass
class StepResult:
    """``chosen_logps``/``rejected_logps``: per-sequence log-probs from ``compute_ref_log_probs`` on the policy, which
    are the policy's, or under PEFT without a reference model the base model's (adapters disabled)."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    grads: dict[str, torch.Tensor]
    metrics: dict[str, float]
    batch: dict[str, Any]


@dataclass
class AccumulatedStep:
    losses: list[float]
    grads: dict[str, torch.Tensor]
    metrics: dict[str, list[float]]
    batches: list[dict[str, Any]]


def plain_text_rows() -> list[dict[str, str]]:
    """Prompts of different lengths in one batch; responses from one token (EOS only) to a long one."""
    rows = [
        ("The river", " runs north past the mill.", ""),
        ("Name a prime number larger than ten, and say why it is prime. " * 3, " 13", " 12, as it is even."),
        ("Q:", " A long answer that goes on " * 6, " No."),
        ("Write one word about the sea. " * 8, " blue", " deep and cold and dark and wide"),
    ]
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected} for prompt, chosen, rejected in rows]


def conversational_rows(num_examples: int = 6, seed: int = 0, **lengths: Any) -> Dataset:
    """Multi-turn conversations; the Capybara ``prompt`` column is dropped, since TRL itself cannot read it.
    ``lengths`` go to ``make_preference_dataset`` (``prompt_words``, ``response_words``, ``turns``)."""
    return normalize_schema(make_preference_dataset(num_examples, seed=seed, **lengths))


def conversations(num_examples: int = 4, seed: int = 3) -> Dataset:
    """Multi-turn conversations of about 40 to 150 tokens: quick to train on, and longer than the sliding windows
    (16 to 24 tokens) of the architecture tests."""
    return conversational_rows(num_examples, seed=seed, prompt_words=(20, 90), response_words=(3, 25))


def lora_config() -> LoraConfig:
    # init_lora_weights=False draws B as well as A at random: with PEFT's default B = 0 the policy would be the
    # reference (adapters disabled) and the loss trivially log(2).
    return LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)


def perturbed_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copied.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * parameter.std().nan_to_num(1.0) * noise)
    return copied


def layout_flags(prefix_sharing: bool, packing_length: int | str | None, group_by_prefix: bool) -> dict[str, Any]:
    """Our trainers' layout flags, as the harnesses take them."""
    packing = {} if packing_length is None else {"enable_packing": True, "packing_length": str(packing_length)}
    return {"prefix_sharing": prefix_sharing, "group_by_prefix": group_by_prefix, **packing}


def build_pair(
    classes: tuple[tuple[type[Trainer], type], tuple[type[Trainer], type]],
    common: dict[str, Any],
    ours_flags: dict[str, Any],
    tmp_path,
    trainer_kwargs: Callable[[type[Trainer]], dict[str, Any]],
    warn_ours: bool = False,
) -> tuple[Trainer, Trainer]:
    """TRL's trainer and ours (``classes``: each trainer with its config class) on the same config, ours with
    ``ours_flags`` added; ``trainer_kwargs`` gives each its models and data. Warnings are silenced, except ours with
    ``warn_ours``."""
    trainers = []
    for side, ((trainer_cls, config_cls), extra) in enumerate(zip(classes, ({}, ours_flags), strict=True)):
        output_dir = str(tmp_path / trainer_cls.__name__) if tmp_path is not None else "/tmp/prefix-dpo-tests"
        args = config_cls(output_dir=output_dir, **common, **extra)
        with warnings.catch_warnings():
            if not (warn_ours and side == 1):
                warnings.simplefilter("ignore")
            trainers.append(trainer_cls(args=args, **trainer_kwargs(trainer_cls)))
    return trainers[0], trainers[1]


def make_trainers(
    dataset: Dataset,
    model_type: str = "llama",
    attn_implementation: str = "sdpa",
    model_overrides: dict[str, Any] | None = None,
    reference: str = "model",
    tmp_path=None,
    prefix_sharing: bool = True,
    packing_length: int | None = None,
    ours_attn_implementation: str | None = None,
    group_by_prefix: bool = False,
    tokenizer=None,
    peft_config: PeftConfig | None = None,
    **config: Any,
) -> tuple[DPOTrainer, PrefixDPOTrainer]:
    """``reference``: "model" (an explicit reference model), "precompute" (precomputed reference log-probs) or
    "path" (the reference saved to a path that TRL loads it from: the policy is given as that path, and its weights
    are then replaced by the policy's). ``packing_length`` packs our side, and ``group_by_prefix`` batches its pairs
    by prompt; ``ours_attn_implementation`` gives our side another attention backend than TRL's (flex_attention on a
    GPU); flags TRL's config does not have go to our side only. ``peft_config`` trains the same adapters on both sides
    against the policy with its adapters disabled (no reference model). ``tokenizer`` defaults to the shipped one. The
    batch is the whole dataset unless ``per_device_train_batch_size`` says otherwise (a streamed dataset needs it)."""
    trl_fields = {field.name for field in dataclasses.fields(DPOConfig)}
    ours_only = {key: config.pop(key) for key in list(config) if key not in trl_fields}  # e.g. packing_window
    overrides = {"initializer_range": CONTEXT_SENSITIVE_INIT, **(model_overrides or {})}
    policy = tiny_model(model_type, seed=0, **overrides)
    ref_model = None if peft_config is not None else perturbed_copy(policy)
    policy.set_attn_implementation(attn_implementation)
    if ref_model is not None:
        ref_model.set_attn_implementation(attn_implementation)
    tokenizer = tokenizer or load_tokenizer()
    common = dict(
        report_to="none",
        bf16=config.pop("bf16", False),
        per_device_train_batch_size=config.pop("per_device_train_batch_size", None) or len(dataset),
        gradient_checkpointing=config.pop("gradient_checkpointing", False),
        max_length=config.pop("max_length", None),
        precompute_ref_log_probs=reference == "precompute",
        model_init_kwargs={"attn_implementation": attn_implementation} if reference == "path" else None,
        **config,
    )
    if reference == "path":
        model_path = tmp_path / "reference"
        if not model_path.exists():
            ref_model.save_pretrained(model_path)
            tokenizer.save_pretrained(model_path)

    def models(trainer_cls: type[DPOTrainer]) -> dict[str, Any]:
        if reference == "path":
            model, ref = str(model_path), None
        else:
            model, ref = copy.deepcopy(policy), copy.deepcopy(ref_model)
            if trainer_cls is PrefixDPOTrainer and ours_attn_implementation is not None:
                model.set_attn_implementation(ours_attn_implementation)
                ref.set_attn_implementation(ours_attn_implementation)
        return dict(
            model=model, ref_model=ref, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )

    flags = {**layout_flags(prefix_sharing, packing_length, group_by_prefix), **ours_only}
    trl_trainer, ours = build_pair(
        ((DPOTrainer, DPOConfig), (PrefixDPOTrainer, PrefixDPOConfig)), common, flags, tmp_path, models
    )
    if reference == "path":  # TRL loaded the reference from the path; the policy is the one of the other cases
        for trainer in (trl_trainer, ours):
            trainer.model.load_state_dict(policy.state_dict())
    if peft_config is not None:  # the same random adapters on both sides
        ours.model.load_state_dict(trl_trainer.model.state_dict())
    return trl_trainer, ours


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def backward_step(
    trainer: Trainer,
    examples: list[dict[str, Any]] | None = None,
    batch_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    return_outputs: bool = False,
) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """One loss + backward through the trainer's hooks on ``examples`` (tokenized; by default the whole training set)
    as a single batch, under the trainer's mixed precision (accelerate's autocast, which ``Trainer.train`` puts on the
    prepared model's forward). Returns the loss, the
    outputs (with ``return_outputs``), the gradients, the metrics the trainer logged and the batch."""
    if examples is None:
        examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))  # onto the trainer's device
    if batch_transform is not None:
        batch = batch_transform(batch)
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    with trainer.accelerator.autocast():
        result = trainer.compute_loss(trainer.model, batch, return_outputs=return_outputs)
    loss, outputs = result if return_outputs else (result, None)
    loss.backward()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), outputs, gradients(trainer.model), metrics, batch


def train_step(trainer: DPOTrainer, batch_transform=None, examples: list[dict[str, Any]] | None = None) -> StepResult:
    """One loss + backward (``backward_step``), and the per-sequence log-probs of the batch."""
    loss, _, grads, metrics, batch = backward_step(trainer, examples, batch_transform)
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)  # autocasts itself
    return StepResult(loss, chosen, rejected, grads, metrics, batch)


def accumulated_step(trainer: Trainer, micro_batches: int) -> AccumulatedStep:
    """The gradient of one optimizer step as ``Trainer.train`` accumulates it: the first ``micro_batches`` batches
    of the trainer's own train dataloader through ``training_step`` (set ``gradient_accumulation_steps`` to match),
    each loss scaled by the accumulation and the gradients summed."""
    batches, num_items = trainer.get_batch_samples(
        iter(trainer.get_train_dataloader()), micro_batches, trainer.args.device
    )
    assert len(batches) == micro_batches, "the dataloader has fewer batches than asked for"
    trainer.current_gradient_accumulation_steps = len(batches)
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    losses = [trainer.training_step(trainer.model, batch, num_items).item() for batch in batches]
    metrics = {key: list(values) for key, values in trainer._metrics["train"].items()}
    return AccumulatedStep(losses, gradients(trainer.model), metrics, batches)


def enable_activation_checkpointing(trainer: Trainer) -> None:
    """Turns activation checkpointing on as ``Trainer.train`` does (``train_step`` runs outside ``train``)."""
    kwargs = dict(trainer.args.activation_checkpointing_kwargs or {})
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error: elementwise ratios blow up on entries that are zero up to rounding."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_each_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, scale: float | None = None
) -> None:
    """Element by element: within ``rtol`` of the expected value (or of ``scale``), and 1e-6 absolute."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    pairs = zip(actual.flatten().tolist(), expected.flatten().tolist(), strict=True)
    for index, (value, reference) in enumerate(pairs):
        bound = rtol * (abs(reference) if scale is None else scale) + 1e-6
        assert abs(value - reference) <= bound, (index, value, reference)


# Gradients that are zero in exact arithmetic hold only rounding, such as an attention key bias's (softmax ignores a
# constant added to every score of a query): each gradient is compared within rtol of its own norm or of this share
# of the largest one (float32 leaves such a gradient about 2e-10 of the largest, measured on LLaVA).
GRAD_FLOOR = 1e-3


def assert_same_grads(ours: dict[str, torch.Tensor], trl: dict[str, torch.Tensor], rtol: float = RTOL) -> None:
    assert ours.keys() == trl.keys()
    largest = max(grad.double().norm().item() for grad in trl.values())
    assert largest > 0
    for name, grad in trl.items():
        scale = max(grad.double().norm().item(), GRAD_FLOOR * largest)
        assert (ours[name].double() - grad.double()).norm().item() <= rtol * scale, name


def assert_same_step(
    ours: StepResult,
    trl: StepResult,
    rtol: float = RTOL,
    beta: float = 0.1,
    grad_rtol: float | None = None,
    metrics_atol: float = 1e-6,
) -> None:
    """``rtol`` for the loss, the log-probs and the metrics; ``grad_rtol`` (default ``rtol``) for the gradients;
    ``metrics_atol`` for metrics that are means of values of both signs (mean logits), near zero."""
    assert relative_error(ours.loss, trl.loss) <= rtol, (ours.loss, trl.loss)
    # Per-sequence log-probs, each to tolerance: a vector norm would let one wrong short sequence hide among long ones.
    assert_each_close(ours.chosen_logps, trl.chosen_logps, rtol)
    assert_each_close(ours.rejected_logps, trl.rejected_logps, rtol)
    assert_same_grads(ours.grads, trl.grads, rtol if grad_rtol is None else grad_rtol)
    # TRL's own metrics, computed by its unchanged loss code from our per-token outputs.
    logps_scale = torch.cat([trl.chosen_logps, trl.rejected_logps]).abs().max().item()
    assert_close_metrics(ours.metrics, trl.metrics, rtol, beta * logps_scale, metrics_atol)


def assert_close_metrics(
    ours: dict[str, float], trl: dict[str, float], rtol: float, rewards_scale: float, atol: float = 1e-6
) -> None:
    """Each of TRL's values to tolerance. Rewards are beta times a difference of two sequence log-probs, so their
    rounding error scales with the log-probs (``rewards_scale``: beta times their size), not with the reward."""
    for key, value in trl.items():
        scale = abs(value) + (rewards_scale if "rewards/" in key else 0.0)
        assert abs(ours[key] - value) <= rtol * scale + atol, (key, ours[key], value)


def assert_same_accumulation(ours: AccumulatedStep, trl: AccumulatedStep, rtol: float = RTOL) -> None:
    """The same examples in the same micro-batches, the same scaled losses, the same metrics logged by every
    micro-batch and the same summed gradients."""
    for ours_batch, trl_batch in zip(ours.batches, trl.batches, strict=True):
        assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    assert_each_close(torch.tensor(ours.losses), torch.tensor(trl.losses), rtol)

    def each_value(metrics: dict[str, list[float]]) -> dict[str, float]:
        return {f"{key}/{index}": value for key, values in metrics.items() for index, value in enumerate(values)}

    assert_same_metrics(each_value(ours.metrics), each_value(trl.metrics), rtol)
    assert_same_grads(ours.grads, trl.grads, rtol)


def compared_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The logged values both trainers compute (not timings, not this project's token counters)."""
    return {key: value for key, value in metrics.items() if not any(word in key for word in NOT_COMPARED)}


def assert_same_metrics(ours: dict[str, float], trl: dict[str, float], rtol: float = RTOL, beta: float = 0.1) -> None:
    """Logged metrics (evaluation results, a log_history entry): the same keys, each value to tolerance; the mean
    sequence log-probs logged beside the rewards give their scale."""
    expected = compared_metrics(trl)
    assert expected.keys() == compared_metrics(ours).keys()
    logps_scale = max((abs(value) for key, value in expected.items() if "logps/" in key), default=0.0)
    assert_close_metrics(ours, expected, rtol, beta * logps_scale)


def assert_flex_forward_matches(trl_trainer: DPOTrainer, ours: PrefixDPOTrainer, rtol: float = RTOL) -> None:
    """FlexAttention has no CPU backward, so its BlockMask is checked on the forward: the sequence log-probs."""
    chosen_error, rejected_error = flex_forward_errors(trl_trainer, ours)
    assert chosen_error <= rtol and rejected_error <= rtol, (chosen_error, rejected_error)


def flex_forward_errors(trl_trainer: DPOTrainer, ours: PrefixDPOTrainer) -> tuple[float, float]:
    """Relative errors of our chosen and rejected log-probs under FlexAttention (forward only) against TRL's."""
    ours.model.set_attn_implementation("flex_attention")
    examples = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
    with torch.no_grad():
        ours_chosen, ours_rejected = ours.compute_ref_log_probs(ours.model, ours.data_collator(examples))
        trl_chosen, trl_rejected = trl_trainer.compute_ref_log_probs(
            trl_trainer.model, trl_trainer.data_collator(examples)
        )
    return relative_error(ours_chosen, trl_chosen), relative_error(ours_rejected, trl_rejected)


def tree_tokens(sequences) -> int:
    """Tokens the prefix tree of ``sequences`` holds, counted independently of the layout: their distinct non-empty
    prefixes (a token of the tree is the last token of the prefix that leads to it)."""
    return len({tuple(sequence[:end]) for sequence in sequences for end in range(1, len(sequence) + 1)})


def leaves(shared: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(rows, length)``, True at the last token of each leaf of the layout's trees (a sequence that no other one
    extends): a real token whose subtree ends right after it. Any other token's subtree holds the rest of its node
    and its node's children."""
    index = torch.arange(1, shared["subtree_end"].shape[1] + 1)
    return (shared["subtree_end"] == index) & (shared["sequence_ids"] != collators.PADDING_SEQUENCE)


def responses_per_document(shared: dict[str, torch.Tensor]) -> int:
    """The most leaves one document of a layout holds: its distinct responses, when none is a prefix of another."""
    ends = leaves(shared)
    counts = [
        int(ends[row][sequences == document].sum())
        for row, sequences in enumerate(shared["sequence_ids"])
        for document in set(sequences.tolist()) - {collators.PADDING_SEQUENCE}
    ]
    return max(counts)
