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
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import collators
from embedded import load_tokenizer, make_preference_dataset, tiny_model
from preference_data import normalize_schema
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

CONTEXT_SENSITIVE_INIT = 0.2
# Relative error allowed between the two trainers (float32, different summation orders in attention).
RTOL = 1e-5


@dataclass
class StepResult:
    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    grads: dict[str, torch.Tensor]
    metrics: dict[str, float]
    batch: dict[str, Any]


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


def perturbed_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copied.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * parameter.std().nan_to_num(1.0) * noise)
    return copied


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
    group_by_prompt: bool = False,
    tokenizer=None,
    **config: Any,
) -> tuple[DPOTrainer, PrefixDPOTrainer]:
    """``reference``: "model" (an explicit reference model), "precompute" (precomputed reference log-probs) or
    "path" (policy given as a path: TRL loads the reference from it). ``packing_length`` packs our side, and
    ``group_by_prompt`` batches its pairs by prompt; ``ours_attn_implementation`` gives our side another attention
    backend than TRL's (flex_attention on a GPU); flags TRL's config does not have go to our side only.
    ``tokenizer`` defaults to the shipped one. The batch is the whole dataset unless ``per_device_train_batch_size``
    says otherwise (a streamed dataset needs it)."""
    packing = {} if packing_length is None else {"enable_packing": True, "packing_length": str(packing_length)}
    trl_fields = {field.name for field in dataclasses.fields(DPOConfig)}
    ours_only = {key: config.pop(key) for key in list(config) if key not in trl_fields}  # e.g. packing_window
    overrides = {"initializer_range": CONTEXT_SENSITIVE_INIT, **(model_overrides or {})}
    policy = tiny_model(model_type, seed=0, **overrides)
    ref_model = perturbed_copy(policy)
    policy.set_attn_implementation(attn_implementation)
    ref_model.set_attn_implementation(attn_implementation)
    tokenizer = tokenizer or load_tokenizer()
    common = dict(
        report_to="none",
        bf16=False,
        per_device_train_batch_size=config.pop("per_device_train_batch_size", None) or len(dataset),
        gradient_checkpointing=False,
        max_length=None,
        precompute_ref_log_probs=reference == "precompute",
        model_init_kwargs={"attn_implementation": attn_implementation} if reference == "path" else None,
        **config,
    )
    trainers = []
    for trainer_cls, config_cls, extra in (
        (DPOTrainer, DPOConfig, {}),
        (
            PrefixDPOTrainer,
            PrefixDPOConfig,
            {"prefix_sharing": prefix_sharing, "group_by_prompt": group_by_prompt, **packing, **ours_only},
        ),
    ):
        output_dir = str(tmp_path / trainer_cls.__name__) if tmp_path is not None else "/tmp/prefix-dpo-tests"
        args = config_cls(output_dir=output_dir, **common, **extra)
        if reference == "path":
            model_path = tmp_path / "policy"
            if not model_path.exists():
                policy.save_pretrained(model_path)
                tokenizer.save_pretrained(model_path)
            model, ref = str(model_path), None
        else:
            model, ref = copy.deepcopy(policy), copy.deepcopy(ref_model)
            if trainer_cls is PrefixDPOTrainer and ours_attn_implementation is not None:
                model.set_attn_implementation(ours_attn_implementation)
                ref.set_attn_implementation(ours_attn_implementation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainers.append(
                trainer_cls(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
            )
    return trainers[0], trainers[1]


def train_step(trainer: DPOTrainer, batch_transform=None, examples: list[dict[str, Any]] | None = None) -> StepResult:
    """One loss + backward through the trainer's hooks on ``examples`` (tokenized) as a single batch; by default the
    whole training set."""
    if examples is None:
        examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))  # onto the trainer's device
    if batch_transform is not None:
        batch = batch_transform(batch)
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return StepResult(loss.detach(), chosen, rejected, grads, metrics, batch)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error: elementwise ratios blow up on entries that are zero up to rounding."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_same_step(ours: StepResult, trl: StepResult, rtol: float = RTOL, beta: float = 0.1) -> None:
    assert relative_error(ours.loss, trl.loss) <= rtol, (ours.loss, trl.loss)
    assert relative_error(ours.chosen_logps, trl.chosen_logps) <= rtol, (ours.chosen_logps, trl.chosen_logps)
    assert relative_error(ours.rejected_logps, trl.rejected_logps) <= rtol, (ours.rejected_logps, trl.rejected_logps)
    # Per-sequence log-probs must match one by one, not only as a vector.
    for ours_logp, trl_logp in zip(ours.rejected_logps.tolist(), trl.rejected_logps.tolist(), strict=True):
        assert abs(ours_logp - trl_logp) <= rtol * abs(trl_logp) + 1e-6
    assert ours.grads.keys() == trl.grads.keys()
    assert sum(g.norm() for g in trl.grads.values()) > 0
    for name, grad in trl.grads.items():
        assert relative_error(ours.grads[name], grad) <= rtol, name
    # TRL's own metrics, computed by its unchanged loss code from our per-token outputs. Rewards are beta times a
    # difference of two sequence log-probs, so their rounding error scales with the log-probs, not with the reward.
    logps_scale = torch.cat([trl.chosen_logps, trl.rejected_logps]).abs().max().item()
    for key, value in trl.metrics.items():
        scale = abs(value) + (beta * logps_scale if key.startswith("rewards/") else 0.0)
        assert abs(ours.metrics[key] - value) <= rtol * scale + 1e-6, (key, ours.metrics[key], value)


def assert_flex_forward_matches(trl_trainer: DPOTrainer, ours: PrefixDPOTrainer, rtol: float = RTOL) -> None:
    """FlexAttention has no CPU backward, so its BlockMask is checked on the forward: the sequence log-probs."""
    ours.model.set_attn_implementation("flex_attention")
    examples = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
    with torch.no_grad():
        ours_chosen, ours_rejected = ours.compute_ref_log_probs(ours.model, ours.data_collator(examples))
        trl_chosen, trl_rejected = trl_trainer.compute_ref_log_probs(
            trl_trainer.model, trl_trainer.data_collator(examples)
        )
    assert relative_error(ours_chosen, trl_chosen) <= rtol
    assert relative_error(ours_rejected, trl_rejected) <= rtol


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
