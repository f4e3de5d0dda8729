"""TRL's DPOTrainer with prefix sharing: one forward per example over ``prompt | chosen | rejected``, and, across
the examples of a row, every prefix that their sequences share once (a prompt that pairs share, a system prompt,
earlier turns: the prefix tree of ``collators.py``).

Only the computation of per-token log-probabilities changes. The collator adds the shared layout to TRL's standard
batch; the model's forward (already given TRL's fused LM head) runs the shared layout and hands back its per-token
outputs in the standard ``[chosen rows; rejected rows]`` layout, so TRL's losses, metrics and logging run unchanged.

Mixture-of-experts models add the router load-balancing loss computed over the tokens the shared forward ran: with
prefix sharing each prompt token counts once, where TRL's standard layout counts it twice (``router_aux_loss``).
Models with token mixers that no attention mask governs (convolution, state-space, linear-attention layers) train on
TRL's standard layout instead, with a warning (``shared_layout.SharedLayoutTrainer``).
"""

import copy
import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference
from trl.trainer.utils import FusedCausalLMOutput

from collators import PrefixSharingCollator
from packing import packing_statistics
from preference_data import check_config, check_datasets_not_empty, finish_tokenized, normalize_schema
from shared_layout import SharedLayoutArguments, SharedLayoutTrainer, check_shared_layout_model, shared_backbone
from vision import (
    PrefixSharingVisionCollator,
    multimodal_positions,
    unknown_vision_layout,
    vision_collator_fields,
    vision_layout_examples,
)

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class PrefixDPOConfig(SharedLayoutArguments, DPOConfig):
    """``DPOConfig`` plus the shared-layout flags (``shared_layout.SharedLayoutArguments``) and prompt truncation."""

    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "When prompt + the longer response exceed `max_length`, keep the last `max_prompt_length` prompt "
            "tokens, then cut the responses to fit. Must be smaller than `max_length`."
        },
    )

    def __post_init__(self):
        self.settle_layout_flags()
        check_config(self)
        super().__post_init__()


def check_truncation_mode(args: DPOConfig | None, data_collator=None, train_dataset=None, *_, **__) -> None:
    """Prefix sharing needs one prompt before both responses. Checked when the trainer is built, not in the config,
    so that TRL's own order holds for vision data: its config warns that keep_end is deprecated, its trainer refuses
    keep_end for vision-language models."""
    if not getattr(args, "prefix_sharing", False) or args.truncation_mode == "keep_start":
        return
    first = next(iter(train_dataset), {}) if train_dataset is not None else {}
    if "image" in first or "images" in first:
        return  # TRL's DPOTrainer raises for keep_end on vision data
    raise ValueError(
        f"--truncation_mode {args.truncation_mode} cuts the prompt differently before each response, so it "
        "cannot be shared. Use --truncation_mode keep_start with --max_prompt_length."
    )


def add_shared_forward(model: PreTrainedModel) -> None:
    """Lets ``model`` (already given TRL's fused LM head) take a ``shared_inputs`` batch from the collator.

    Called with ``shared_inputs``, the forward runs the backbone once on the shared layout, gathers the hidden states
    of the distinct (state, label) reads (``score_index``, see ``shared_layout.shared_backbone``) and scores each once
    with TRL's fused head. The per-token outputs come back expanded to every completion token (``score_inverse``; the
    gradient of a read sums over the tokens that share it) and scattered into the standard layout of ``labels``, zero
    elsewhere, as TRL's fused head returns them; ``loss`` is the head's mean negative log-likelihood over those tokens.
    """
    if getattr(model, "_has_shared_forward", False):
        return
    fused_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, shared_inputs=None, labels=None, **kwargs):
        if shared_inputs is None or not kwargs.get("fused_lm_head"):
            # No shared layout, or a caller wanting logits (TRL's deprecated `return_outputs`): the standard forward.
            return fused_forward(*args, labels=labels, **kwargs)
        if args:
            raise TypeError("The prefix-sharing forward takes keyword arguments only.")
        # The standard-layout `input_ids`/`attention_mask` define `labels` (and multimodal positions); the shared
        # layout replaces them.
        standard_ids = kwargs.pop("input_ids", None)
        standard_mask = kwargs.pop("attention_mask", None)
        score_mask = labels[:, 1:] != -100
        token_labels = labels[:, 1:][score_mask]
        inverse = shared_inputs["score_inverse"].to(token_labels.device)
        mismatch = ValueError(
            f"The shared layout reads {len(inverse)} completion tokens and the batch has {len(token_labels)}, or they "
            "differ: the batch was not built by PrefixSharingCollator from the same examples."
        )
        if len(inverse) != len(token_labels):
            raise mismatch
        # The label of each distinct read, which every completion token mapped onto it must carry.
        read_labels = token_labels.new_empty(len(shared_inputs["score_index"])).scatter_(0, inverse, token_labels)
        if not torch.equal(read_labels[inverse], token_labels):
            raise mismatch
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)

        router_logits: list = []
        with shared_backbone(self, shared_inputs, router_logits) as layout:
            if "standard_index" in shared_inputs:
                layout["position_ids"] = multimodal_positions(self, shared_inputs, standard_ids, standard_mask)
            outputs = fused_forward(**layout, shift_labels=read_labels.unsqueeze(0), **kwargs)
        per_token = {
            name: None
            if value is None
            else value.new_zeros(score_mask.shape).masked_scatter(score_mask, value[0][inverse])
            for name in PER_TOKEN_FIELDS
            for value in [getattr(outputs, name)]
        }
        # The fused head's loss averages over the distinct reads; TRL's, over the completion tokens.
        items = score_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -per_token["log_probs"].sum() / items
        aux_loss = outputs.aux_loss
        if router_logits:
            aux_loss = router_aux_loss(router_logits[0], self.config, shared_inputs["sequence_ids"] >= 0)
            loss = loss + getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, label_mask=score_mask, aux_loss=aux_loss, **per_token)

    model.forward = types.MethodType(forward, model)
    model._has_shared_forward = True


def router_aux_loss(router_logits: tuple[torch.Tensor, ...], config, tokens: torch.Tensor) -> torch.Tensor:
    """The router load-balancing loss TRL's fused head computes (Mixtral's, which every MoE family shares), over the
    positions where ``tokens`` is True: the tokens a forward ran, padding excluded.

    It is the Switch Transformer loss ``E * sum_e f_e * P_e`` (``f_e`` the share of top-k assignments to expert ``e``,
    ``P_e`` its mean router probability, both over all layers and the given tokens). In the shared layout every
    token of a row's prefix tree runs once (each prompt token once, and a start that sequences share once), so it is
    that loss over the tree; TRL's standard layout runs, and counts, each prompt token twice. Packing without sharing
    runs the same tokens as TRL, so the value is TRL's.
    """
    text_config = config.get_text_config()
    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, tokens.to(router_logits[0].device)
    )


class PrefixDPOTrainer(SharedLayoutTrainer, DPOTrainer):
    """``DPOTrainer`` that computes per-token log-probs from one forward over each row's prefix tree, every shared
    prefix once (``prefix_sharing``), and/or over packed rows (``enable_packing``).

    With both off it is TRL's trainer, plus the token counters it logs and the shared truncation rule
    (``max_prompt_length``). Policy, reference model, ``precompute_ref_log_probs`` and evaluation all use the same
    layout. The loss, its variants and the metrics are TRL's, computed from per-token outputs in TRL's layout.
    """

    _tag_names = ["trl", "dpo", "prefix-sharing"]
    standard_tokens_metric = "tokens/standard_dpo"
    shortest_shared_start = 1

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *more_args, **kwargs):
        check_datasets_not_empty(*more_args, **kwargs)
        check_truncation_mode(args, *more_args, **kwargs)
        self._start_shared_layout([model, ref_model], args)
        super().__init__(model, ref_model, args, *more_args, **kwargs)
        self._finish_shared_layout()

    def _use_shared_layout(self) -> None:
        """Installs the shared forward on the policy and reference model and extends TRL's collator (idempotent)."""
        if not (self.shares_prefix or self.packs) or self._keeps_standard_layout():
            return
        check_shared_layout_model(self.model.config)
        add_shared_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.ref_model is not None:
            add_shared_forward(self.accelerator.unwrap_model(self.ref_model))
        if self._is_vision_dataset:
            more = vision_collator_fields(self.model, self._tokenizer)
            self._replace_collator(DataCollatorForVisionPreference, PrefixSharingVisionCollator, **more)
        else:
            self._replace_collator(DataCollatorForPreference, PrefixSharingCollator)

    def _why_standard_layout(self) -> str | None:
        unknown = unknown_vision_layout(self.model) if self._is_vision_dataset else None
        return super()._why_standard_layout() or unknown

    def _layout_examples(self, dataset) -> list[dict[str, Sequence[int]]]:
        if self._is_vision_dataset:
            rows = (
                dataset
                if isinstance(dataset, Dataset)
                else [dict(zip(dataset, row, strict=True)) for row in zip(*dataset.values(), strict=True)]
            )
            token_id = self.model.config.image_token_id
            return vision_layout_examples(self.processing_class, rows, token_id, self.args.max_length)
        columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in columns]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = normalize_schema(dataset, dataset_name, args)
        # TRL drops prompts that alone fill `max_length`; finish_tokenized decides instead, since a prompt may be cut
        # to `max_prompt_length`. Everything else of TRL's preparation (prompt extraction, EOS, tokenization) is kept.
        tokenize_args = copy.copy(args)
        tokenize_args.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, tokenize_args, dataset_name)
        return finish_tokenized(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its __init__, before this class's __init__ could install the shared layout.
        self._use_shared_layout()
        rows = batch_size
        if self.packs and not isinstance(dataset, IterableDataset):
            if self.args.precompute_ref_batch_size is None:
                # TRL batches examples in dataset order (its cache is per example); pack as many as fill the rows of
                # a batch, instead of padding one example to a whole row.
                stats = packing_statistics(self._example_lengths(dataset), self.args.packing_length)
                batch_size = max(1, round(stats["mean_examples_per_row"] * batch_size))
            rows = self._most_rows(dataset, batch_size)
        # TRL's precompute loader collates with `data_collator` itself, outside `_get_dataloader`.
        with self._batch_rows(rows):
            return super()._precompute_ref_logps(dataset, name, batch_size)

    def _most_rows(self, dataset, batch_size: int) -> int:
        """The most rows a batch of TRL's precompute loader packs into: its consecutive ``batch_size`` examples."""
        examples = self._layout_examples(dataset)
        batches = (examples[start : start + batch_size] for start in range(0, len(examples), batch_size))
        return max(len(self.data_collator.layout_rows(batch)) for batch in batches)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_tokens(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
