"""TRL's DPOTrainer with prefix sharing: one forward per example over ``prompt | chosen | rejected``.

Only the computation of per-token log-probabilities changes. The collator adds the shared layout to TRL's standard
batch; the model's forward (already given TRL's fused LM head) runs the shared layout and hands back its per-token
outputs in the standard ``[chosen rows; rejected rows]`` layout, so TRL's losses, metrics and logging run unchanged.
"""

import copy
import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel
from transformers.utils import is_torch_bf16_gpu_available
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import FusedCausalLMOutput

from collators import MASKABLE_BACKENDS, PrefixSharingCollator, attention_mask_for, unsupported_backend_message
from preference_data import normalize_schema, truncate_dataset

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class PrefixDPOConfig(DPOConfig):
    """``DPOConfig`` plus prefix sharing, prompt truncation and packing flags.

    ``bf16`` and ``output_dir`` also accept a bare flag (``--bf16``, ``--output_dir`` with no value), as the paper's
    commands use them. On a machine without a bf16 accelerator, bf16 falls back to float32 with a warning.
    """

    prefix_sharing: bool = field(
        default=False,
        metadata={"help": "Run each example once as `prompt | chosen | rejected` instead of two sequences."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "When prompt + the longer response exceed `max_length`, keep the last `max_prompt_length` prompt "
            "tokens, then cut the responses to fit. Must be smaller than `max_length`."
        },
    )
    enable_packing: bool = field(
        default=False, metadata={"help": "Pack several examples into each row, up to `packing_length` tokens."}
    )
    packing_length: str | None = field(
        default=None, metadata={"help": "Tokens per packed row: an integer, or `auto` to derive it from the data."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision (default on when a bf16 accelerator is present).",
            "nargs": "?",
            "const": True,
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where checkpoints and the final model go (default: `outputs`).", "nargs": "?"},
    )

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "outputs"
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.bf16 and not self.use_cpu and not is_torch_bf16_gpu_available():
            warnings.warn(
                "bf16 was requested but no bf16-capable accelerator is present: training in float32 instead. "
                "Pass --use_cpu to force bf16 autocast on the CPU.",
                stacklevel=3,
            )
            self.bf16 = False
        if self.max_prompt_length is not None and (
            self.max_length is None or self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"--max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"--max_length ({self.max_length})."
            )
        if self.prefix_sharing and self.truncation_mode != "keep_start":
            raise ValueError(
                f"--truncation_mode {self.truncation_mode} cuts the prompt differently before each response, so it "
                "cannot be shared. Use --truncation_mode keep_start with --max_prompt_length."
            )
        if self.enable_packing or self.packing_length is not None:
            raise NotImplementedError(
                "--enable_packing / --packing_length: sequence packing is not built yet. Run without them."
            )
        super().__post_init__()


def add_shared_forward(model: PreTrainedModel) -> None:
    """Lets ``model`` (already given TRL's fused LM head) take a ``shared_inputs`` batch from the collator.

    Called with ``shared_inputs``, the forward runs the backbone once on the shared layout, gathers the hidden state
    that predicts each completion token (``score_index``) and scores them with TRL's fused head. The per-token outputs
    come back scattered into the standard layout of ``labels``, zero elsewhere, as TRL's fused head returns them.
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
        # The standard-layout `input_ids`/`attention_mask` only define `labels`; the shared layout replaces them.
        kwargs.pop("input_ids", None)
        kwargs.pop("attention_mask", None)
        score_mask = labels[:, 1:] != -100
        score_index = shared_inputs["score_index"]
        if score_index.numel() != int(score_mask.sum()):
            raise ValueError(
                f"The shared layout scores {score_index.numel()} tokens but the batch has {int(score_mask.sum())} "
                "completion tokens: the batch was not built by PrefixSharingCollator from the same examples."
            )

        def gather_scored_states(module, inputs, output):
            # TRL's fused head reads `last_hidden_state`; handing it only the predicting states (one row, aligned with
            # `shift_labels`) lets it score exactly the completion tokens, on every device.
            output.last_hidden_state = output.last_hidden_state.flatten(0, 1)[score_index].unsqueeze(0)
            return output

        handle = self.base_model.register_forward_hook(gather_scored_states)
        try:
            outputs = fused_forward(
                input_ids=shared_inputs["input_ids"],
                position_ids=shared_inputs["position_ids"],
                attention_mask=attention_mask_for(shared_inputs, self.config, self.dtype),
                shift_labels=labels[:, 1:][score_mask].unsqueeze(0),
                **kwargs,
            )
        finally:
            handle.remove()
        per_token = {
            name: None if value is None else value.new_zeros(score_mask.shape).masked_scatter(score_mask, value[0])
            for name in PER_TOKEN_FIELDS
            for value in [getattr(outputs, name)]
        }
        return FusedCausalLMOutput(loss=outputs.loss, label_mask=score_mask, aux_loss=outputs.aux_loss, **per_token)

    model.forward = types.MethodType(forward, model)
    model._has_shared_forward = True


def _attention_backend(model: Any, args: DPOConfig) -> str | None:
    if isinstance(model, str):
        return (args.model_init_kwargs or {}).get("attn_implementation")
    return model.config._attn_implementation


def _fall_back_from_flex(model: Any, args: DPOConfig) -> None:
    if isinstance(model, str):
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "attn_implementation": "sdpa"}
    else:
        model.set_attn_implementation("sdpa")


class PrefixDPOTrainer(DPOTrainer):
    """``DPOTrainer`` that, with ``args.prefix_sharing``, computes per-token log-probs from one forward per example.

    With ``prefix_sharing=False`` it is TRL's trainer, plus the token counters it logs and the shared truncation rule
    (``max_prompt_length``). Policy, reference model and ``precompute_ref_log_probs`` all use the shared forward.
    """

    _tag_names = ["trl", "dpo", "prefix-sharing"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *more_args, **kwargs):
        if args is not None:
            self._check_attention_backend(model, ref_model, args)
        super().__init__(model, ref_model, args, *more_args, **kwargs)
        self._use_shared_forward()
        self.tokens_computed = 0
        self.tokens_standard = 0

    @property
    def shares_prefix(self) -> bool:
        return bool(getattr(self.args, "prefix_sharing", False))

    @staticmethod
    def _check_attention_backend(model: Any, ref_model: PreTrainedModel | None, args: DPOConfig) -> None:
        backend = _attention_backend(model, args)
        if backend == "flex_attention" and not torch.cuda.is_available():
            warnings.warn(
                "flex_attention has no backward pass without CUDA: running sdpa with a dense attention mask instead.",
                stacklevel=3,
            )
            _fall_back_from_flex(model, args)
            if ref_model is not None:
                _fall_back_from_flex(ref_model, args)
        elif getattr(args, "prefix_sharing", False) and backend is not None and backend not in MASKABLE_BACKENDS:
            raise ValueError(unsupported_backend_message(backend))

    def _use_shared_forward(self) -> None:
        """Installs the shared forward on the policy and reference model and extends TRL's collator (idempotent)."""
        if not self.shares_prefix:
            return
        config = self.model.config
        if config._attn_implementation not in MASKABLE_BACKENDS:
            raise ValueError(unsupported_backend_message(config._attn_implementation))
        if self.aux_loss_enabled:
            raise ValueError(
                f"{config.model_type} adds a router load-balancing loss computed over a padding mask, which the "
                "prefix-sharing layout does not have. Set --router_aux_loss_coef 0 or train without --prefix_sharing."
            )
        add_shared_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.ref_model is not None:
            add_shared_forward(self.accelerator.unwrap_model(self.ref_model))
        collator = self.data_collator
        if type(collator) is DataCollatorForPreference:
            # FlexAttention compiles once per shape: bucket the shared rows to bound the number of shapes.
            bucket = 128 if config._attn_implementation == "flex_attention" else collator.pad_to_multiple_of
            self.data_collator = PrefixSharingCollator(
                pad_token_id=collator.pad_token_id,
                max_length=collator.max_length,
                truncation_mode=collator.truncation_mode,
                pad_to_multiple_of=collator.pad_to_multiple_of,
                shared_pad_to_multiple_of=bucket,
            )
        elif not isinstance(collator, PrefixSharingCollator):
            raise ValueError(
                f"--prefix_sharing needs a PrefixSharingCollator, got a custom {type(collator).__name__}. Leave "
                "`data_collator` unset."
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = normalize_schema(dataset)
        # TRL drops prompts that alone fill `max_length`; truncate_dataset decides instead, since a prompt may be cut
        # to `max_prompt_length`. Everything else of TRL's preparation (prompt extraction, EOS, tokenization) is kept.
        tokenize_args = copy.copy(args)
        tokenize_args.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, tokenize_args, dataset_name)
        map_kwargs = {"num_proc": args.dataset_num_proc} if hasattr(dataset, "__len__") else {}
        dataset, dropped = truncate_dataset(
            dataset, args.max_length, getattr(args, "max_prompt_length", None), **map_kwargs
        )
        if dropped:
            warnings.warn(
                f"{dropped} {dataset_name} examples dropped: their prompt alone fills max_length={args.max_length} "
                "tokens. Set --max_prompt_length to truncate such prompts instead.",
                stacklevel=2,
            )
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its __init__, before this class's __init__ could install the shared forward.
        self._use_shared_forward()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_tokens(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """Logs the tokens this step's forward computed beside those standard DPO would compute."""
        standard = inputs["attention_mask"].sum()
        shared = inputs.get("shared_inputs")
        computed = standard if shared is None else (shared["sequence_ids"] >= 0).sum()
        computed, standard = (
            self.accelerator.gather_for_metrics(torch.stack([computed, standard])[None]).sum(0).tolist()
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["tokens/computed"].append(computed)
        self._metrics[mode]["tokens/standard_dpo"].append(standard)
        self._metrics[mode]["tokens/saved_share"].append(1 - computed / standard if standard else 0.0)
        if mode == "train":
            self.tokens_computed += computed
            self.tokens_standard += standard
