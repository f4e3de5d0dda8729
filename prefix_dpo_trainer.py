"""TRL's DPOTrainer with prefix sharing: one forward per example over ``prompt | chosen | rejected``.

Only the computation of per-token log-probabilities changes. The collator adds the shared layout to TRL's standard
batch; the model's forward (already given TRL's fused LM head) runs the shared layout and hands back its per-token
outputs in the standard ``[chosen rows; rejected rows]`` layout, so TRL's losses, metrics and logging run unchanged.

Mixture-of-experts models add the router load-balancing loss computed over the tokens the shared forward ran: with
prefix sharing each prompt token counts once, where TRL's standard layout counts it twice (``router_aux_loss``).
Models with token mixers that no attention mask governs (convolution, state-space, linear-attention layers) train on
TRL's standard layout instead, with a warning.
"""

import copy
import functools
import itertools
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.trainer_pt_utils import BatchRebalanceSampler
from transformers.utils import is_torch_bf16_gpu_available
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import FusedCausalLMOutput

from collators import (
    MASKABLE_BACKENDS,
    PrefixSharingCollator,
    attention_mask_for,
    attention_windows,
    shared_sequence_length,
    unmasked_token_mixers,
    unsupported_backend_message,
)
from packing import PackedBatchSampler, PackedStream, auto_packing_length, packing_statistics
from preference_data import check_config, check_datasets_not_empty, finish_tokenized, normalize_schema

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
        default=False,
        metadata={
            "help": "Pack several examples into each row of `packing_length` tokens; `per_device_train_batch_size` "
            "then counts rows."
        },
    )
    packing_length: str | None = field(
        default=None,
        metadata={
            "help": "Tokens per packed row: an integer, or `auto` (default): 1.1 x the 95th percentile of the "
            "example lengths, rounded up to a multiple of 128, times 4, as the paper chose. A streamed dataset needs "
            "an integer."
        },
    )
    packing_window: int = field(
        default=4096,
        metadata={
            "help": "Examples packed together by best-fit decreasing: each epoch packs windows of this many shuffled "
            "examples (so that row mates change between epochs); a streamed dataset is read and packed this many "
            "examples at a time, holding at most twice as many."
        },
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
        check_config(self)
        if self.prefix_sharing and self.truncation_mode != "keep_start":
            raise ValueError(
                f"--truncation_mode {self.truncation_mode} cuts the prompt differently before each response, so it "
                "cannot be shared. Use --truncation_mode keep_start with --max_prompt_length."
            )
        if self.packing_length is not None and not self.enable_packing:
            raise ValueError("--packing_length is only used with --enable_packing.")
        if self.enable_packing:
            self.packing_length = parse_packing_length(self.packing_length)
            if self.packing_window < 1:
                raise ValueError(f"--packing_window must be at least 1 example, got {self.packing_window}.")
        super().__post_init__()


def parse_packing_length(value: str | int | None) -> str | int:
    """``auto`` (the default) or a positive number of tokens."""
    if value is None or str(value).lower() == "auto":
        return "auto"
    if isinstance(value, int) or str(value).isdigit():
        if int(value) > 0:
            return int(value)
    raise ValueError(f"--packing_length must be a positive integer or 'auto', got {value!r}.")


def cached_attention_mask(shared_inputs: dict[str, Any], config, dtype: torch.dtype):
    """The batch's attention mask, built once: the policy and the reference forward of a step share it."""
    key = f"attention_mask:{config._attn_implementation}:{dtype}:{sorted(attention_windows(config).items())}"
    if key not in shared_inputs:
        shared_inputs[key] = attention_mask_for(shared_inputs, config, dtype)
    return shared_inputs[key]


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

        router_logits = []

        def gather_scored_states(module, inputs, output):
            # TRL's fused head reads `last_hidden_state`; handing it only the predicting states (one row, aligned with
            # `shift_labels`) lets it score exactly the completion tokens, on every device.
            output.last_hidden_state = output.last_hidden_state.flatten(0, 1)[score_index].unsqueeze(0)
            if getattr(output, "router_logits", None) is not None:
                # The fused head would weight these by `attention_mask`, here the shared layout's (rows, 1, L, L)
                # mask: take them, so that it adds nothing, and weight them by the tokens that ran instead.
                router_logits.append(output.router_logits)
                output.router_logits = None
            return output

        handle = self.base_model.register_forward_hook(gather_scored_states)
        try:
            outputs = fused_forward(
                input_ids=shared_inputs["input_ids"],
                position_ids=shared_inputs["position_ids"],
                attention_mask=cached_attention_mask(shared_inputs, self.config, self.dtype),
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
        loss, aux_loss = outputs.loss, outputs.aux_loss
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
    prompt token runs once, so it is that loss over ``prompt | chosen | rejected``; TRL's standard layout runs, and
    counts, each prompt token twice. Packing without sharing runs the same tokens as TRL, so the value is TRL's.
    """
    text_config = config.get_text_config()
    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, tokens.to(router_logits[0].device)
    )


def _attention_backend(model: Any, args: DPOConfig) -> str | None:
    if isinstance(model, str):
        return (args.model_init_kwargs or {}).get("attn_implementation")
    return model.config._attn_implementation


def _fall_back_from_flex(model: Any, args: DPOConfig) -> None:
    if isinstance(model, str):
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "attn_implementation": "sdpa"}
    else:
        model.set_attn_implementation("sdpa")


def gather_uneven(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """``accelerator.gather`` for tensors whose first dimension differs between processes (padded, then trimmed)."""
    gather = type(accelerator).gather
    if tensor.ndim == 0 or accelerator.num_processes == 1:
        return gather(accelerator, tensor)
    sizes = gather(accelerator, torch.tensor([len(tensor)], device=tensor.device)).tolist()
    padded = gather(accelerator, accelerator.pad_across_processes(tensor, dim=0))
    width = max(sizes)
    return torch.cat([padded[rank * width : rank * width + size] for rank, size in enumerate(sizes)])


class RankBatches(BatchRebalanceSampler):
    """One process's share of a :class:`PackedBatchSampler`: batches ``rank, rank + W, rank + 2W, ...``.

    Subclassing ``BatchRebalanceSampler`` is how ``Trainer`` recognises a rank-aware batch sampler: it passes it as
    ``batch_sampler`` and keeps accelerate from sharding it a second time. None of its parent's logic is used.
    """

    def __init__(self, batches: PackedBatchSampler, num_processes: int, process_index: int):
        self.batches = batches
        self.num_processes = num_processes
        self.process_index = process_index
        # accelerate's DataLoaderShard.set_epoch reaches a batch sampler's epoch through its `sampler` attribute.
        self.sampler = batches

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.process_index, None, self.num_processes)

    def __len__(self) -> int:
        return len(self.batches) // self.num_processes


class BatchPerItem:
    """``collate_fn`` for a DataLoader over a :class:`PackedStream`, whose items are whole batches: the loader takes
    one item at a time (``batch_size=1``, which accelerate's per-process sharding of a stream needs) and this hands
    the item's examples to the collator."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, items: list[list[dict[str, Any]]]) -> dict[str, Any]:
        (examples,) = items
        return self.collator(examples)


def _dispatch_per_process(args: DPOConfig) -> None:
    """With accelerate's ``dispatch_batches`` (its default for a streamed dataset, which TRL turns off only for a
    streamed train set), process 0 collates every batch and then cuts each tensor of it to the per-process batch size
    along the first dimension. ``shared_inputs`` are not one row per sequence (one row per example or per packed
    row, and a flat ``score_index``), so each process collates its own batches instead."""
    if args.accelerator_config.dispatch_batches:
        warnings.warn(
            "dispatch_batches=True is turned off with --prefix_sharing or --enable_packing: accelerate would cut "
            "the shared layout's tensors, which are not one row per sequence, to the batch size. Each process "
            "collates its own batches instead.",
            stacklevel=3,
        )
    args.accelerator_config.dispatch_batches = False


class PrefixDPOTrainer(DPOTrainer):
    """``DPOTrainer`` that computes per-token log-probs from one forward per example (``prefix_sharing``) and/or
    over packed rows (``enable_packing``).

    With both off it is TRL's trainer, plus the token counters it logs and the shared truncation rule
    (``max_prompt_length``). Policy, reference model, ``precompute_ref_log_probs`` and evaluation all use the same
    layout. The loss, its variants and the metrics are TRL's, computed from per-token outputs in TRL's layout.
    """

    _tag_names = ["trl", "dpo", "prefix-sharing"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *more_args, **kwargs):
        self.tokens_computed = 0
        self.tokens_standard = 0
        self.examples_trained = 0
        self.standard_layout_reason: str | None = None
        check_datasets_not_empty(*more_args, **kwargs)
        if args is not None:
            self._check_attention_backend(model, ref_model, args)
            if getattr(args, "prefix_sharing", False) or getattr(args, "enable_packing", False):
                _dispatch_per_process(args)
        super().__init__(model, ref_model, args, *more_args, **kwargs)
        self._use_shared_layout()
        if self.packs and self.accelerator.num_processes > 1:
            # Packed batches hold a different number of examples on each process, and TRL gathers its per-example
            # metrics (rewards, log-probs) with `accelerator.gather`, which needs the same shape on every process.
            self.accelerator.gather = functools.partial(gather_uneven, self.accelerator)

    @property
    def shares_prefix(self) -> bool:
        return bool(getattr(self.args, "prefix_sharing", False)) and self.standard_layout_reason is None

    @property
    def packs(self) -> bool:
        return bool(getattr(self.args, "enable_packing", False)) and self.standard_layout_reason is None

    @staticmethod
    def _check_attention_backend(model: Any, ref_model: PreTrainedModel | None, args: DPOConfig) -> None:
        backend = _attention_backend(model, args)
        custom_mask = getattr(args, "prefix_sharing", False) or getattr(args, "enable_packing", False)
        if backend == "flex_attention" and not torch.cuda.is_available():
            warnings.warn(
                "flex_attention has no backward pass without CUDA: running sdpa with a dense attention mask instead.",
                stacklevel=3,
            )
            _fall_back_from_flex(model, args)
            if ref_model is not None:
                _fall_back_from_flex(ref_model, args)
        elif custom_mask and backend is not None and backend not in MASKABLE_BACKENDS:
            raise ValueError(unsupported_backend_message(backend))

    def _use_shared_layout(self) -> None:
        """Installs the shared forward on the policy and reference model and extends TRL's collator (idempotent)."""
        if not (self.shares_prefix or self.packs):
            return
        config = self.model.config
        mixers = unmasked_token_mixers(self.model)
        if mixers:
            self.standard_layout_reason = (
                f"Model type '{config.model_type}' has {', '.join(repr(kind) for kind in mixers)} layers, which mix "
                "tokens whatever the attention mask says (convolution, state-space or linear-attention layers): in "
                "the shared or packed layout the chosen tokens would reach the rejected ones, and packed examples "
                "each other. --prefix_sharing and --enable_packing are off for this model: it trains on TRL's "
                "standard layout, exactly, without their savings."
            )
            warnings.warn(self.standard_layout_reason, stacklevel=3)
            return
        if config._attn_implementation not in MASKABLE_BACKENDS:
            raise ValueError(unsupported_backend_message(config._attn_implementation))
        attention_windows(config)  # raises, naming the model type, for attention that a mask cannot express
        add_shared_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.ref_model is not None:
            add_shared_forward(self.accelerator.unwrap_model(self.ref_model))
        collator = self.data_collator
        if isinstance(collator, PrefixSharingCollator):
            return
        if type(collator) is not DataCollatorForPreference:
            raise ValueError(
                f"--prefix_sharing and --enable_packing need a PrefixSharingCollator; got a custom "
                f"{type(collator).__name__}. Leave `data_collator` unset."
            )
        packing_length = self._resolve_packing_length() if self.packs else None
        # FlexAttention compiles once per shape: bucket unpacked rows to bound the number of shapes.
        bucket = 128 if config._attn_implementation == "flex_attention" else collator.pad_to_multiple_of
        self.data_collator = PrefixSharingCollator(
            pad_token_id=collator.pad_token_id,
            max_length=collator.max_length,
            truncation_mode=collator.truncation_mode,
            pad_to_multiple_of=collator.pad_to_multiple_of,
            shared_pad_to_multiple_of=bucket,
            packing_length=packing_length,
            share_prompt=self.shares_prefix,
        )

    def _example_lengths(self, dataset) -> list[int]:
        """Tokens each example takes in the shared layout (prompt counted once with prefix sharing, else twice)."""
        columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
        return [
            shared_sequence_length({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, self.shares_prefix)
            for p, c, r in columns
        ]

    def _resolve_packing_length(self) -> int:
        if self.args.packing_length == "auto" and isinstance(self.train_dataset, IterableDataset):
            raise ValueError(
                "--packing_length auto is computed from every example's length, which a streamed dataset does not "
                "give up front. Give a number of tokens, e.g. --packing_length 16384 (an example longer than it is "
                "an error naming the example when it is read)."
            )
        if self.args.packing_length == "auto":
            lengths = self._example_lengths(self.train_dataset)
            self.args.packing_length, stats = auto_packing_length(lengths)
            self.accelerator.print(
                f"--packing_length auto: {self.args.packing_length} tokens per row (1.1 x the 95th percentile "
                f"{stats['p95']:.0f} of the example lengths, median {stats['median']:.0f}, rounded up to 128, x 4); "
                f"{stats['mean_examples_per_row']:.2f} examples per row, {stats['packing_efficiency']:.1%} of tokens "
                "are not padding."
            )
        datasets = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            datasets.update(self.eval_dataset)
        elif self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
        for name, dataset in datasets.items():
            if isinstance(dataset, IterableDataset):
                continue  # PackedStream checks each example as it is read
            lengths = self._example_lengths(dataset)
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[longest] > self.args.packing_length:
                raise ValueError(
                    f"Example {longest} of the {name} dataset takes {lengths[longest]} tokens, more than "
                    f"--packing_length {self.args.packing_length}. The smallest packing length that fits every "
                    f"example is {lengths[longest]}; or lower --max_length to truncate examples."
                )
        return self.args.packing_length

    def _packed_batches(self, dataset, rows_per_batch: int, shuffle: bool) -> RankBatches:
        batches = PackedBatchSampler(
            self._example_lengths(dataset),
            self.args.packing_length,
            rows_per_batch=rows_per_batch,
            num_processes=self.args.world_size,
            shuffle=shuffle,
            seed=self.args.seed,
            window_size=self.args.packing_window,
        )
        return RankBatches(batches, self.args.world_size, self.args.process_index)

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        if not (self.packs and isinstance(dataset, IterableDataset)):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        # A stream has no lengths up front, so no batch sampler: PackedStream packs it window by window and yields
        # every process's batches in turn, which accelerate deals out one per process (a multiple of the process
        # count per window, so every process takes the same number of steps).
        stream = PackedStream(
            dataset,
            functools.partial(shared_sequence_length, share_prompt=self.shares_prefix),
            self.args.packing_length,
            rows_per_batch=batch_size,
            num_processes=self.args.world_size,
            window_size=self.args.packing_window,
            shuffle=is_training,
            seed=self.args.seed,
            name="train" if is_training else "eval",
        )
        collator = self._get_collator_with_removed_columns(self.data_collator, description=description)
        loader = DataLoader(
            stream,
            batch_size=1,
            collate_fn=BatchPerItem(collator),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        dataloader = super().get_train_dataloader()
        batches = getattr(dataloader.batch_sampler, "batch_sampler", dataloader.batch_sampler)
        if isinstance(batches, RankBatches) and hasattr(dataloader, "set_sampler"):
            # On a mid-epoch resume, accelerate's skip_first_batches rebuilds the loader, and on several processes its
            # set_epoch only reaches a sampler the BatchSamplerShard exposes as `sampler`: accelerate sets it for its
            # own seeded sampler, we do for ours. Without it the resumed epoch replays epoch 0's batches.
            dataloader.set_sampler(batches.sampler)
        return dataloader

    def _get_train_sampler(self, train_dataset=None):
        if not self.packs:
            return super()._get_train_sampler(train_dataset)
        return self._packed_batches(train_dataset or self.train_dataset, self.args.per_device_train_batch_size, True)

    def _get_eval_sampler(self, eval_dataset):
        if not self.packs:
            return super()._get_eval_sampler(eval_dataset)
        return self._packed_batches(eval_dataset, self.args.per_device_eval_batch_size, False)

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
        if self.packs and self.args.precompute_ref_batch_size is None and not isinstance(dataset, IterableDataset):
            # TRL batches examples in dataset order (its cache is per example); pack as many as fill the rows of a
            # batch, instead of padding one example to a whole row.
            stats = packing_statistics(self._example_lengths(dataset), self.args.packing_length)
            batch_size = max(1, round(stats["mean_examples_per_row"] * batch_size))
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_tokens(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """Logs the tokens this step's forward computed beside those standard DPO would compute, and packing."""
        standard = inputs["attention_mask"].sum()
        shared = inputs.get("shared_inputs")
        if shared is None:
            computed, positions, rows = standard, inputs["attention_mask"].numel(), inputs["attention_mask"].shape[0]
        else:
            computed, positions, rows = (
                (shared["sequence_ids"] >= 0).sum(),
                shared["sequence_ids"].numel(),
                len(shared["sequence_ids"]),
            )
        examples = inputs["attention_mask"].shape[0] // 2
        counts = torch.stack(
            [torch.as_tensor(x, device=standard.device) for x in (computed, standard, positions, rows, examples)]
        )
        computed, standard, positions, rows, examples = (
            self.accelerator.gather_for_metrics(counts[None]).sum(0).tolist()
        )
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        metrics["tokens/computed"].append(computed)
        metrics["tokens/standard_dpo"].append(standard)
        metrics["tokens/saved_share"].append(1 - computed / standard if standard else 0.0)
        if self.packs:
            metrics["packing/efficiency"].append(computed / positions)
            metrics["packing/examples_per_row"].append(examples / rows)
        if mode == "train":
            self.tokens_computed += computed
            self.tokens_standard += standard
            self.examples_trained += examples
