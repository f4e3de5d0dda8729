"""TRL's RewardTrainer with prefix sharing: the common token prefix of a pair's chosen and rejected sequences runs
once, and pairs of one prompt share it.

TRL's reward model scores ``prompt + chosen`` and ``prompt + rejected`` as two sequences and reads each reward at the
sequence's last token that is not padding. Here the collator splits each pair at the common token prefix of its two
tokenized sequences and lays it out as DPO prefix sharing does (``collators.py``: groups, packing and masks included);
the model's forward runs the backbone once over that layout (``shared_layout.shared_backbone``) and applies the
model's own score head to the states where TRL's sequence classifier reads. The rewards come back in TRL's
``[chosen rows; rejected rows]`` order, so TRL's loss (``margin``, ``center_rewards_coefficient``) and its metrics run
unchanged.
"""

import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from collators import PrefixRewardCollator, split_common_prefixes
from preference_data import check_datasets_not_empty, normalize_schema
from shared_layout import SharedLayoutArguments, SharedLayoutTrainer, check_shared_layout_model, shared_backbone


@dataclass
class PrefixRewardConfig(SharedLayoutArguments, RewardConfig):
    """``RewardConfig`` plus the shared-layout flags (``shared_layout.SharedLayoutArguments``)."""

    def __post_init__(self):
        self.settle_layout_flags()
        super().__post_init__()


def add_shared_score_forward(model: PreTrainedModel) -> None:
    """Lets a sequence classifier (transformers' ``...ForSequenceClassification``: a ``score`` head over the
    backbone's states) take a ``shared_inputs`` batch from :class:`collators.PrefixRewardCollator`.

    Called with ``shared_inputs``, the forward runs the backbone once on the shared layout and applies the score head
    to the states at ``score_index``: the last token that is not padding of each distinct standard sequence, where the
    standard forward pools its logits (a sequence several pairs hold is scored once). It returns those pooled logits
    for every sequence (``score_inverse``), ``(2 * pairs, num_labels)``, in the standard order.
    """
    if getattr(model, "_has_shared_forward", False):
        return
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `score` head: prefix sharing reads the reward with the head of "
            "transformers' sequence classifiers (AutoModelForSequenceClassification), as TRL's RewardTrainer does."
        )
    standard_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, shared_inputs=None, **kwargs):
        if shared_inputs is None:
            return standard_forward(*args, **kwargs)
        if args:
            raise TypeError("The prefix-sharing forward takes keyword arguments only.")
        # The standard-layout batch only says how many sequences there are; the shared layout replaces it. `margin` is
        # an input of TRL's loss that TRL leaves in the batch it hands the model.
        sequences = len(kwargs.pop("input_ids"))
        kwargs.pop("attention_mask", None)
        kwargs.pop("margin", None)
        inverse = shared_inputs["score_inverse"]
        if len(inverse) != sequences:
            raise ValueError(
                f"The shared layout reads {len(inverse)} sequences but the batch has {sequences}: the batch was not "
                "built by PrefixRewardCollator from the same examples."
            )
        with shared_backbone(self, shared_inputs) as layout:
            states = self.base_model(**layout, **kwargs).last_hidden_state
        return SequenceClassifierOutputWithPast(logits=self.score(states[0])[inverse.to(states.device)])

    model.forward = types.MethodType(forward, model)
    model._has_shared_forward = True


class PrefixRewardTrainer(SharedLayoutTrainer, RewardTrainer):
    """``RewardTrainer`` that scores each pair from one forward over ``prefix | chosen | rejected``, and the pairs of
    one prefix in a batch or packed row as one group (``prefix_sharing``), and/or over packed rows
    (``enable_packing``).

    With both off it is TRL's trainer plus the token counters. The dataset is prepared by TRL (after the schema checks
    of ``preference_data.normalize_schema``, which also reads the Capybara schema). TRL's tokenized pairs carry no
    prompt, so the prompt of a pair is the common token prefix of its two sequences, and pairs linked by a shared
    sequence or an equal prefix (the pairs of one prompt, in all-pairs data) form one group with the prefix common to
    all of them (``collators.split_common_prefixes``): ``--group_by_prefix`` batches such groups together.
    """

    _tag_names = ["trl", "reward-trainer", "prefix-sharing"]
    standard_tokens_metric = "tokens/standard"

    def __init__(self, model, args: RewardConfig | None = None, *more_args, **kwargs):
        check_datasets_not_empty(*more_args, **kwargs)
        self._start_shared_layout([model], args)
        super().__init__(model, args, *more_args, **kwargs)
        self._finish_shared_layout()

    def _use_shared_layout(self) -> None:
        """Installs the shared forward on the model and extends TRL's collator (idempotent)."""
        if not (self.shares_prefix or self.packs) or self._keeps_standard_layout():
            return
        check_shared_layout_model(self.model.config)
        add_shared_score_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._replace_collator(DataCollatorForPreference, PrefixRewardCollator)

    def _layout_examples(self, dataset) -> list[dict[str, Sequence[int]]]:
        columns = zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        return split_common_prefixes(
            [{"chosen_ids": chosen, "rejected_ids": rejected} for chosen, rejected in columns]
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" not in (dataset.column_names or []):
            dataset = normalize_schema(dataset, dataset_name, args)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_tokens(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
