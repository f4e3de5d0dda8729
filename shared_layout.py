"""The trainer side of the shared layout, common to ``PrefixDPOTrainer`` and ``PrefixRewardTrainer``.

* :class:`SharedLayoutArguments`: the flags both configs add to TRL's (``--prefix_sharing``, ``--enable_packing``,
  ``--packing_length``, ``--group_by_prefix``, and the paper's bare ``--bf16``/``--output_dir``).
* :func:`shared_backbone`: runs a model's backbone once over a batch's shared layout (``collators.py``) under its
  attention mask, keeping only the hidden states at ``score_index`` (each distinct read once). Each trainer's forward
  puts its own head on them, TRL's fused LM head (DPO log-probs) or the sequence classifier's score head (rewards),
  and hands every standard read its result through ``score_inverse``.
* :class:`SharedLayoutTrainer`: what both trainers add to TRL's: attention-backend checks, the standard-layout
  fallback of models with token mixers no mask governs, the packing length, the batch samplers (packed rows, groups of
  one prompt or prompt prefix), packed streams, dataloaders padded to a fixed row count, and token counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PreTrainedModel, TrainingArguments
from transformers.trainer_pt_utils import BatchRebalanceSampler
from transformers.utils import is_torch_bf16_gpu_available

from collators import (
    MASKABLE_BACKENDS,
    TOKEN_TYPE_FIELDS,
    SharedLayoutCollator,
    attention_mask_for,
    attention_windows,
    layout_sizes,
    prompt_row_key,
    unmasked_token_mixers,
    unsupported_backend_message,
)
from flex_compile_watchdog import FlexCompileWatchdog, listen_for_fallbacks
from packing import PackedBatchSampler, PackedStream, Size, auto_packing_length, row_tokens


@dataclass
class SharedLayoutArguments:
    """Flags mixed into ``PrefixDPOConfig`` and ``PrefixRewardConfig`` (placed before TRL's config in the bases).

    ``bf16`` and ``output_dir`` also accept a bare flag (``--bf16``, ``--output_dir`` with no value), as the paper's
    commands use them. On a machine without a bf16 accelerator, bf16 falls back to float32 with a warning.
    """

    prefix_sharing: bool = field(
        default=False,
        metadata={
            "help": "Run each pair once as `prompt | chosen | rejected` instead of two sequences; every prefix that "
            "sequences of a batch row (or packed row) share runs once: pairs of one prompt share it, a response they "
            "share runs once, and so do a common system prompt and earlier turns."
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
    group_by_prefix: bool = field(
        default=False,
        metadata={
            "help": "Put the pairs of one prompt in the same batch (with packing: the same row), so that they share "
            "it; without packing, batches also gather pairs whose prompts start with the same long prefix (a system "
            "prompt, a tool block), which the collator lays out as one tree. Batches hold whole groups of one "
            "prompt; a group that does not fit one is split into consecutive chunks of its pairs in dataset order, "
            "each as large as fits. Needs `prefix_sharing`."
        },
    )
    group_by_prompt: bool = field(
        default=False, metadata={"help": "Deprecated: the old spelling of `group_by_prefix`, which it turns on."}
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

    def settle_layout_flags(self) -> None:
        """Defaults and checks of the flags above; call first in the config's ``__post_init__``."""
        if self.output_dir is None:
            self.output_dir = "outputs"
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.bf16 and not self.use_cpu and not is_torch_bf16_gpu_available():
            warnings.warn(
                "bf16 was requested but no bf16-capable accelerator is present: training in float32 instead. "
                "Pass --use_cpu to force bf16 autocast on the CPU.",
                stacklevel=4,
            )
            self.bf16 = False
        if self.packing_length is not None and not self.enable_packing:
            raise ValueError("--packing_length is only used with --enable_packing.")
        if self.enable_packing:
            self.packing_length = parse_packing_length(self.packing_length)
            if self.packing_window < 1:
                raise ValueError(f"--packing_window must be at least 1 example, got {self.packing_window}.")
        self.group_by_prefix = self.group_by_prefix or self.group_by_prompt
        if self.group_by_prefix and not self.prefix_sharing:
            raise ValueError(
                "--group_by_prefix (or its old spelling --group_by_prompt) batches the pairs of one prompt together "
                "so that they share it, which needs --prefix_sharing."
            )


def parse_packing_length(value: str | int | None) -> str | int:
    """``auto`` (the default) or a positive number of tokens."""
    if value is None or str(value).lower() == "auto":
        return "auto"
    if isinstance(value, int) or str(value).isdigit():
        if int(value) > 0:
            return int(value)
    raise ValueError(f"--packing_length must be a positive integer or 'auto', got {value!r}.")


# A batch's masks, by the identity of its token tensor: the batch itself stays plain data, and its masks go with it.
_BATCH_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def cached_attention_mask(shared_inputs: dict[str, Any], config, dtype: torch.dtype):
    """The batch's attention mask, built once: the policy and the reference forward of a step share it."""
    masks = _BATCH_MASKS.setdefault(shared_inputs["input_ids"], {})
    key = (config._attn_implementation, dtype, tuple(attention_windows(config).items()))
    if key not in masks:
        masks[key] = attention_mask_for(shared_inputs, config, dtype)
    return masks[key]


@contextlib.contextmanager
def shared_backbone(
    model: PreTrainedModel, shared_inputs: dict[str, torch.Tensor], router_logits: list | None = None
) -> Iterator[dict[str, Any]]:
    """Yields the inputs that run ``model``'s backbone on the shared layout; inside, the backbone's output keeps only
    the states at ``score_index``, as one row.

    Handing the head only those states (for DPO, aligned with the ``shift_labels`` of the distinct reads) lets it score
    exactly the completion tokens, or the sequences' last tokens, each distinct read once, on every device: the head
    never sees the prompt or padding, nor a response twice.
    Given a list, ``router_logits`` takes an MoE backbone's router logits out of its output: a head would weight them
    by ``attention_mask``, here the layout's ``(rows, 1, L, L)`` mask, where the caller weights them by the tokens
    that ran instead.
    """
    score_index = shared_inputs["score_index"]

    def gather_scored_states(module, inputs, output):
        output.last_hidden_state = output.last_hidden_state.flatten(0, 1)[score_index].unsqueeze(0)
        if router_logits is not None and getattr(output, "router_logits", None) is not None:
            router_logits.append(output.router_logits)
            output.router_logits = None
        return output

    handle = model.base_model.register_forward_hook(gather_scored_states)
    try:
        yield {
            "input_ids": shared_inputs["input_ids"],
            "position_ids": shared_inputs["position_ids"],
            "attention_mask": cached_attention_mask(shared_inputs, model.config, model.dtype),
            **{name: shared_inputs[name] for name in TOKEN_TYPE_FIELDS if name in shared_inputs},
        }
    finally:
        handle.remove()


def check_shared_layout_model(config) -> None:
    """Raises, naming the model, for attention the shared layout's mask cannot reach."""
    if config._attn_implementation not in MASKABLE_BACKENDS:
        raise ValueError(unsupported_backend_message(config._attn_implementation))
    attention_windows(config)


def _attention_backend(model: Any, args: TrainingArguments) -> str | None:
    if isinstance(model, str):
        return (args.model_init_kwargs or {}).get("attn_implementation")
    return model.config._attn_implementation


def _fall_back_from_flex(model: Any, args: TrainingArguments) -> None:
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
    """``collate_fn`` for a DataLoader over a :class:`packing.PackedStream`, whose items are whole batches: the loader
    takes one item at a time (``batch_size=1``, which accelerate's per-process sharding of a stream needs) and this
    hands the item's examples to the collator."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, items: list[list[dict[str, Any]]]) -> dict[str, Any]:
        (examples,) = items
        return self.collator(examples)


def _dispatch_per_process(args: TrainingArguments) -> None:
    """With accelerate's ``dispatch_batches`` (its default for a streamed dataset, which TRL turns off only for a
    streamed train set), process 0 collates every batch and then cuts each tensor of it to the per-process batch size
    along the first dimension. ``shared_inputs`` are not one row per sequence (one row per example, group or packed
    row, and a flat ``score_index``), so each process collates its own batches instead."""
    if args.accelerator_config.dispatch_batches:
        warnings.warn(
            "dispatch_batches=True is turned off with --prefix_sharing or --enable_packing: accelerate would cut "
            "the shared layout's tensors, which are not one row per sequence, to the batch size. Each process "
            "collates its own batches instead.",
            stacklevel=4,
        )
    args.accelerator_config.dispatch_batches = False


class SharedLayoutTrainer:
    """Mixed into a TRL trainer (before it in the bases): the layout's samplers, dataloaders and counters.

    The trainer calls :meth:`_start_shared_layout` before TRL's ``__init__`` and :meth:`_finish_shared_layout` after
    it, and provides :meth:`_use_shared_layout` (installs its forward and collator) and :meth:`_layout_examples` (its
    dataset rows as ``prompt_ids``/``chosen_ids``/``rejected_ids``, the way its collator lays them out).
    """

    # The counter of what the standard path computes, beside `tokens/computed`.
    standard_tokens_metric = "tokens/standard"
    # The start that an example's two sequences always share: none for a reward pair, whose sequences may differ from
    # their first token; a DPO prompt holds at least one token (the first response token is predicted from it).
    shortest_shared_start = 0

    def _start_shared_layout(self, models: Sequence[Any], args: TrainingArguments | None) -> None:
        self.tokens_computed = 0
        self.tokens_standard = 0
        self.examples_trained = 0
        self._sizes_by_dataset: dict[tuple[str, bool], list[Size]] = {}
        self.standard_layout_reason: str | None = None
        if args is not None:
            self._check_attention_backend(models, args)
            if getattr(args, "prefix_sharing", False) or getattr(args, "enable_packing", False):
                _dispatch_per_process(args)
        listen_for_fallbacks()  # before TRL's __init__, which may already run a forward (DPO's precompute)

    def _finish_shared_layout(self) -> None:
        if self.groups:
            self._check_mapped()
        self._use_shared_layout()
        self.compile_watchdog = FlexCompileWatchdog()
        self.add_callback(self.compile_watchdog)
        if self.packs and self.accelerator.num_processes > 1:
            # Packed batches hold a different number of examples on each process, and TRL gathers its per-example
            # metrics (rewards, log-probs) with `accelerator.gather`, which needs the same shape on every process.
            self.accelerator.gather = functools.partial(gather_uneven, self.accelerator)

    def _use_shared_layout(self) -> None:
        raise NotImplementedError

    def _layout_examples(self, dataset: Dataset) -> list[dict[str, Sequence[int]]]:
        raise NotImplementedError

    @property
    def shares_prefix(self) -> bool:
        return bool(getattr(self.args, "prefix_sharing", False)) and self.standard_layout_reason is None

    @property
    def packs(self) -> bool:
        return bool(getattr(self.args, "enable_packing", False)) and self.standard_layout_reason is None

    @property
    def groups(self) -> bool:
        return bool(getattr(self.args, "group_by_prefix", False)) and self.standard_layout_reason is None

    def _keeps_standard_layout(self) -> bool:
        """True, with one warning, for a model the shared layout cannot run exactly (``_why_standard_layout``): it
        trains on TRL's standard layout, exactly, and without the flags' savings."""
        if self.standard_layout_reason is None:
            reason = self._why_standard_layout()
            if reason is not None:
                self.standard_layout_reason = (
                    f"{reason} --prefix_sharing, --enable_packing and --group_by_prefix are off for this model: it "
                    "trains on TRL's standard layout, exactly, without their savings."
                )
                warnings.warn(self.standard_layout_reason, stacklevel=4)
        return self.standard_layout_reason is not None

    def _why_standard_layout(self) -> str | None:
        """Why the model cannot take the shared layout, or ``None``: here, token mixers that no mask governs."""
        mixers = unmasked_token_mixers(self.model)
        if not mixers:
            return None
        return (
            f"Model type '{self.model.config.model_type}' has {', '.join(repr(kind) for kind in mixers)} layers, "
            "which mix tokens whatever the attention mask says (convolution, state-space or linear-attention "
            "layers): in the shared or packed layout the chosen tokens would reach the rejected ones, and packed "
            "examples each other."
        )

    @staticmethod
    def _check_attention_backend(models: Sequence[Any], args: TrainingArguments) -> None:
        model, *others = models
        backend = _attention_backend(model, args)
        custom_mask = getattr(args, "prefix_sharing", False) or getattr(args, "enable_packing", False)
        if backend == "flex_attention" and not torch.cuda.is_available():
            warnings.warn(
                "flex_attention has no backward pass without CUDA: running sdpa with a dense attention mask instead.",
                stacklevel=4,
            )
            for each in (model, *others):
                if each is not None:
                    _fall_back_from_flex(each, args)
        elif custom_mask and backend is not None and backend not in MASKABLE_BACKENDS:
            raise ValueError(unsupported_backend_message(backend))

    def _replace_collator(self, standard: type, shared: type[SharedLayoutCollator], **more: Any) -> None:
        """Swaps TRL's default collator (of type ``standard``) for its shared-layout version (idempotent), which takes
        the fields the two have in common, and ``more``."""
        collator = self.data_collator
        if isinstance(collator, SharedLayoutCollator):
            return
        if type(collator) is not standard:
            raise ValueError(
                f"--prefix_sharing and --enable_packing need a {shared.__name__}; got a custom "
                f"{type(collator).__name__}. Leave `data_collator` unset."
            )
        packing_length = self._resolve_packing_length() if self.packs else None
        # FlexAttention compiles once per shape: bucket unpacked lengths and keep every loader's row count fixed, to
        # bound the number of shapes. Dense masks compile nothing, and padding would only cost them time.
        compiled = self.model.config._attn_implementation == "flex_attention"
        taken = {f.name for f in dataclasses.fields(shared) if f.init}
        fields = {
            f.name: getattr(collator, f.name) for f in dataclasses.fields(collator) if f.init and f.name in taken
        }
        self.data_collator = shared(
            **fields,
            **more,
            shared_pad_to_multiple_of=128 if compiled else collator.pad_to_multiple_of,
            packing_length=packing_length,
            share_prompt=self.shares_prefix,
            static_rows=compiled,
            max_row_tokens=self._longest_example_tokens(),
        )

    def _longest_example_tokens(self) -> int | None:
        """The most tree tokens one example may take under ``max_length`` (``None`` without it): its two sequences of
        at most ``max_length`` tokens each, less the start they always share."""
        max_length = self.args.max_length
        return None if max_length is None else 2 * max_length - self.shortest_shared_start

    def _example_sizes(self, dataset: Dataset) -> list[Size]:
        """What each example takes in a row (see ``collators.layout_sizes``). Computed once per data set (by its
        fingerprint): an example's parts are cut at the prefix tree of the whole set, and packing asks for them
        several times (the auto length, the length check, the sampler, the precompute batch size)."""
        fingerprint = getattr(dataset, "_fingerprint", None)
        if fingerprint is None:  # a single streamed example, as a dict of columns
            return layout_sizes(self._layout_examples(dataset), self.shares_prefix)
        key = (fingerprint, self.shares_prefix)
        if key not in self._sizes_by_dataset:
            self._sizes_by_dataset[key] = layout_sizes(self._layout_examples(dataset), self.shares_prefix)
        return self._sizes_by_dataset[key]

    def _example_lengths(self, dataset: Dataset) -> list[int]:
        """Tokens each example takes laid out alone (prompt counted once with prefix sharing, else twice)."""
        return [row_tokens([size]) for size in self._example_sizes(dataset)]

    def _example_size(self, example: dict[str, Any]) -> Size:
        """What one example of a stream takes in a row, laid out alone."""
        return self._example_sizes({name: [value] for name, value in example.items()})[0]

    def _check_mapped(self) -> None:
        if isinstance(self.train_dataset, IterableDataset):
            raise ValueError(
                "--group_by_prefix plans each epoch's batches from every example's prompt, which a streamed dataset "
                "does not give up front. Drop --dataset_streaming or --group_by_prefix."
            )

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

    def _packed_batches(self, dataset: Dataset, batch_size: int, shuffle: bool) -> RankBatches:
        """This process's batches: packed rows (``batch_size`` rows each), and/or whole groups of one prompt.

        Unpacked groups are planned as packed rows of pairs: every pair has size 1, a "row" is a batch of up to
        ``batch_size`` pairs, so best fit fills batches with whole groups, and gathers the groups whose prompts share
        the key by which the collator merges a batch's examples into one tree (see ``packing.prompt_units``). Packed,
        best fit already puts examples that share parts, a long prefix among them, in one row.
        """
        if self.packs:
            sizes, capacity, rows_per_batch = self._example_sizes(dataset), self.args.packing_length, batch_size
        else:
            sizes, capacity, rows_per_batch = [1] * len(dataset), batch_size, 1
        prompts = prefixes = None
        if self.groups:
            examples = self._layout_examples(dataset)
            prompts = [tuple(example["prompt_ids"]) for example in examples]
            if not self.packs:
                shared = self.data_collator.min_shared_prefix
                prefixes = [prompt_row_key(example["prompt_ids"], shared) for example in examples]
        batches = PackedBatchSampler(
            sizes,
            capacity,
            rows_per_batch=rows_per_batch,
            num_processes=self.args.world_size,
            shuffle=shuffle,
            seed=self.args.seed,
            window_size=self.args.packing_window,
            prompts=prompts,
            prefixes=prefixes,
        )
        return RankBatches(batches, self.args.world_size, self.args.process_index)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        dataloader = super().get_train_dataloader()
        batches = getattr(dataloader.batch_sampler, "batch_sampler", dataloader.batch_sampler)
        if isinstance(batches, RankBatches) and hasattr(dataloader, "set_sampler"):
            # On a mid-epoch resume, accelerate's skip_first_batches rebuilds the loader, and on several processes its
            # set_epoch only reaches a sampler the BatchSamplerShard exposes as `sampler`: accelerate sets it for its
            # own seeded sampler, we do for ours. Without it the resumed epoch replays epoch 0's batches.
            dataloader.set_sampler(batches.sampler)
        return dataloader

    @contextlib.contextmanager
    def _batch_rows(self, rows: int) -> Iterator[None]:
        """Inside, ``data_collator`` is the collator of a loader whose batches take at most ``rows`` rows. With static
        rows (compiled attention) every batch takes exactly that many, the short last one too, so that compiled
        attention sees one row count per loader. Every loader the trainer builds, or TRL builds, collates inside."""
        collator = self.data_collator
        if not isinstance(collator, SharedLayoutCollator):
            yield
            return
        self.data_collator = dataclasses.replace(collator, batch_rows=rows)
        try:
            yield
        finally:
            self.data_collator = collator

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        with self._batch_rows(batch_size):
            if self.packs and isinstance(dataset, IterableDataset):
                return self._packed_stream_loader(dataset, description, batch_size, is_training)
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)

    def _packed_stream_loader(self, dataset, description: str, rows: int, is_training: bool) -> DataLoader:
        """A stream has no lengths up front, so no batch sampler: ``PackedStream`` packs it window by window and
        yields every process's batches in turn, which accelerate deals out one per process (a multiple of the process
        count per window, so every process takes the same number of steps)."""
        stream = PackedStream(
            dataset,
            self._example_size,
            self.args.packing_length,
            rows_per_batch=rows,
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

    def _get_train_sampler(self, train_dataset=None):
        if not (self.packs or self.groups):
            return super()._get_train_sampler(train_dataset)
        return self._packed_batches(train_dataset or self.train_dataset, self.args.per_device_train_batch_size, True)

    def _get_eval_sampler(self, eval_dataset):
        if not (self.packs or self.groups):
            return super()._get_eval_sampler(eval_dataset)
        return self._packed_batches(eval_dataset, self.args.per_device_eval_batch_size, False)

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """Logs the tokens this step's forward computed beside those the standard path would compute, and packing."""
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
        metrics[self.standard_tokens_metric].append(standard)
        metrics["tokens/saved_share"].append(1 - computed / standard if standard else 0.0)
        if self.packs:
            metrics["packing/efficiency"].append(computed / positions)
            metrics["packing/examples_per_row"].append(examples / rows)
        if mode == "train":
            self.tokens_computed += computed
            self.tokens_standard += standard
            self.examples_trained += examples
