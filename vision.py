"""Vision-language preference batches in the shared layout: each prompt's images go through the vision tower once,
and their tokens run once for both responses (and for every pair or prefix that holds them).

TRL's ``DataCollatorForVisionPreference`` processes every example twice, as ``prompt+chosen`` and
``prompt+rejected``: its images are in the batch twice, and the vision tower and the language model run them twice.
:class:`PrefixSharingVisionCollator` processes each example's prompt and images once, with the same processor calls,
and then lays the tokens out as text is laid out (``collators.build_shared_inputs``), with one change: in the prefix
tree an image token is not its placeholder id but a *key* naming the image and the token's place in it. Two prompts
then share a run of tokens only where they hold the same images (the same processed pixels) at the same places, and
an image's tokens stay one contiguous run of one node::

    prompt tokens   <s> <img> <img> <img> Q  ...       <img>: the placeholder id, repeated per image token
    layout keys     <s>  k0    k1    k2   Q  ...       k_i = -(1 + (digest(image) << 20) + i)

After the layout the keys go back to the placeholder id, and the images to the batch in the order their first tokens
appear in the flattened layout, which is the order in which the models put image features in place of the
placeholders. Models that attend within an image both ways (Gemma 3, by ``token_type_ids``) get each image's run as a
bidirectional block of the mask (``visible_from``); models with multimodal rotary positions (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL) get each token the position the model computes for it in TRL's standard layout (``standard_index``, see
:func:`multimodal_positions`).
"""

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages
from trl.trainer.dpo_trainer import DataCollatorForPreference

from collators import TOKEN_TYPE_FIELDS, PrefixSharingCollator

# An image token's key: -(1 + (image digest << INDEX_BITS) + its index in the image). Negative, so that no key is a
# token id; 43 digest bits and 20 index bits fill an int64 (an image has far fewer than 2**20 tokens).
INDEX_BITS = 20
DIGEST_BITS = 43
# Processor outputs with one entry per image, beside `pixel_values`; `image_grid_thw` also says how many rows of
# `pixel_values` (patches) each image takes.
PER_IMAGE_FIELDS = ("image_grid_thw", "image_sizes")


@dataclass
class ProcessedImage:
    """One image of an example as its processor made it: its fields (``pixel_values`` and the per-image fields), a
    digest of them, and the number of tokens it takes in the prompt."""

    fields: dict[str, torch.Tensor]
    digest: int
    tokens: int


@dataclass
class VisionExample:
    """An example's tokens (``prompt_ids`` with the image placeholders, as the model takes them), the prompt as
    layout keys, and its images in prompt order."""

    prompt_ids: list[int]
    prompt_keys: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    images: list[ProcessedImage]
    type_fields: tuple[str, ...]  # the processor's per-token image markers (TOKEN_TYPE_FIELDS) it returned


def image_key(digest: int, index: int) -> int:
    return -(1 + (digest << INDEX_BITS) + index)


def key_index(key):
    """The index in its image of the token an image key names (of each, for a tensor of keys)."""
    return (-key - 1) & ((1 << INDEX_BITS) - 1)


def key_digest(key: int) -> int:
    """The digest of the image an image key names."""
    return (-key - 1) >> INDEX_BITS


def example_images(example: dict[str, Any]) -> list:
    """TRL's vision columns: ``images`` (a list, possibly empty or None) or ``image`` (one image)."""
    if "image" in example:
        return [] if example["image"] is None else [example["image"]]
    return list(example.get("images") or [])


def _split_images(processed: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """The processor's image outputs for ``count`` images, one dict per image."""
    pixel_values = processed["pixel_values"]
    if "image_grid_thw" in processed:  # rows of pixel_values are patches: prod(t, h, w) per image
        patches = processed["image_grid_thw"].prod(-1).tolist()
        pixels = list(pixel_values.split(patches))
    else:
        pixels = list(pixel_values.unbind(0)) if len(pixel_values) == count else None
    if pixels is None or len(pixels) != count:
        raise ValueError(
            f"The processor returned pixel_values of shape {tuple(pixel_values.shape)} for {count} images."
        )
    return [
        {"pixel_values": pixels[i], **{name: processed[name][i] for name in PER_IMAGE_FIELDS if name in processed}}
        for i in range(count)
    ]


def _digest(fields: dict[str, torch.Tensor]) -> int:
    state = hashlib.blake2b(digest_size=8)
    for name in sorted(fields):
        value = fields[name].detach().cpu().contiguous()
        state.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        state.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(state.digest(), "little") >> (64 - DIGEST_BITS)


def _image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of consecutive image tokens."""
    runs: list[tuple[int, int]] = []
    for at, token in enumerate(ids):
        if token != image_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == at:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((at, 1))
    return runs


def process_vision_example(
    processor: ProcessorMixin, example: dict[str, Any], image_token_id: int, row: int, max_length: int | None
) -> VisionExample:
    """Processes one raw example (``prompt``/``chosen``/``rejected``, conversational or standard, and its images) with
    the calls TRL's ``DataCollatorForVisionPreference`` makes, once for the prompt and its images, and truncates it as
    TRL does: each sequence to its first ``max_length`` tokens, which must leave the prompt whole (``row`` names the
    example in errors)."""
    try:
        return _process(processor, example, image_token_id, row, max_length)
    except (ValueError, TypeError) as error:
        if str(error).startswith(f"Example {row}:"):
            raise
        raise ValueError(f"Example {row}: {error}") from error


def _process(
    processor: ProcessorMixin, example: dict[str, Any], image_token_id: int, row: int, max_length: int | None
) -> VisionExample:
    images = example_images(example)
    if is_conversational(example):
        messages = {
            "prompt": prepare_multimodal_messages(example["prompt"], images=images),
            "chosen": prepare_multimodal_messages(example["chosen"]),
            "rejected": prepare_multimodal_messages(example["rejected"]),
        }
        extra = {name: example[name] for name in ("tools", "chat_template_kwargs") if example.get(name) is not None}
        texts = apply_chat_template({**messages, **extra}, processor)
    else:
        texts = example
    processed = processor(
        images=[images] if images else None,
        text=[texts["prompt"]],
        return_tensors="pt",
        add_special_tokens=False,  # as TRL: the chat template has the BOS already
    )
    prompt_ids = processed["input_ids"][0].tolist()
    if max_length is not None and len(prompt_ids) >= max_length:
        raise ValueError(
            f"Example {row}: its prompt takes {len(prompt_ids)} tokens (images included), not fewer than --max_length "
            f"{max_length}, so truncation would cut its responses away, or an image in two. Raise --max_length (or "
            "set it to None)."
        )
    responses = {}
    for column in ("chosen", "rejected"):
        ids = processor(text=[texts[column]], add_special_tokens=False)["input_ids"][0]
        if image_token_id in ids:
            raise ValueError(
                f"Example {row}: its {column} response holds the image token (id {image_token_id}); images belong "
                "in the prompt, which both responses see."
            )
        responses[column] = list(ids)
    runs = _image_runs(prompt_ids, image_token_id)
    if len(runs) == len(images):
        tokens = [length for _, length in runs]
    else:  # images without text between them: the processor says how many tokens each takes
        tokens = list(
            processor._get_num_multimodal_tokens(image_sizes=[_image_size(i) for i in images]).num_image_tokens
        )
    if len(tokens) != len(images) or sum(tokens) != sum(length for _, length in runs):
        raise ValueError(
            f"Example {row}: its prompt has {sum(length for _, length in runs)} image tokens in {len(runs)} runs for "
            f"{len(images)} images; each image needs one placeholder in the prompt, and no more."
        )
    fields = _split_images(processed, len(images)) if images else []
    processed_images = [ProcessedImage(each, _digest(each), count) for each, count in zip(fields, tokens, strict=True)]
    type_fields = tuple(name for name in TOKEN_TYPE_FIELDS if name in processed)
    keys = list(prompt_ids)
    image_positions = [at for start, length in runs for at in range(start, start + length)]
    offset = 0
    for image in processed_images:
        for index in range(image.tokens):
            keys[image_positions[offset + index]] = image_key(image.digest, index)
        offset += image.tokens
    room = None if max_length is None else max_length - len(prompt_ids)
    chosen, rejected = responses["chosen"][:room], responses["rejected"][:room]
    return VisionExample(prompt_ids, keys, chosen, rejected, processed_images, type_fields)


def _image_size(image) -> tuple[int, int]:
    width, height = image.size
    return height, width


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    """Per-image tensors stacked into one batch tensor, zero-padded where images take different numbers of tiles
    (LLaVA-NeXT's ``pixel_values``, whose model reads each image's tile count from ``image_sizes``)."""
    if not values[0].ndim or values[0].ndim == 1:
        return torch.stack(values)
    widest = max(value.shape[0] for value in values)
    padded = [
        torch.nn.functional.pad(value, (0, 0) * (value.ndim - 1) + (0, widest - value.shape[0])) for value in values
    ]
    return torch.stack(padded)


@dataclass
class PrefixSharingVisionCollator(PrefixSharingCollator):
    """:class:`collators.PrefixSharingCollator` for TRL's vision datasets: processes raw examples with
    ``processor`` and adds the images, each once, and the model's multimodal inputs in the shared layout.

    ``image_token_id`` is the placeholder the model puts image features in place of (its config's); with
    ``bidirectional_images`` each image's tokens see each other both ways (Gemma 3); ``standard_positions`` adds what
    the forward needs to give each token its position from TRL's standard layout (multimodal rotary positions).
    """

    processor: ProcessorMixin | None = None
    image_token_id: int = -1
    bidirectional_images: bool = False
    standard_positions: bool = False

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        processed = [
            process_vision_example(self.processor, example, self.image_token_id, row, self.max_length)
            for row, example in enumerate(examples)
        ]
        as_ids = [
            {"prompt_ids": each.prompt_ids, "chosen_ids": each.chosen_ids, "rejected_ids": each.rejected_ids}
            for each in processed
        ]
        batch = DataCollatorForPreference.torch_call(self, as_ids)
        as_keys = [{**ids, "prompt_ids": each.prompt_keys} for ids, each in zip(as_ids, processed, strict=True)]
        shared = self.shared_inputs(
            as_keys, "next_token", batch["input_ids"].shape[1] if self.standard_positions else None
        )
        keys = shared["input_ids"]
        is_image = keys < 0
        shared["input_ids"] = keys.masked_fill(is_image, self.image_token_id)
        for name in dict.fromkeys(name for each in processed for name in each.type_fields):
            shared[name] = is_image.long()
        images = {image.digest: image for each in processed for image in each.images}
        # The images in the order of their first tokens in the flattened layout, the order the model fills them in.
        ordered = [images[key_digest(key)] for key in keys[is_image].tolist() if key_index(key) == 0]
        if ordered:
            patches = "image_grid_thw" in ordered[0].fields
            for name in ordered[0].fields:
                values = [image.fields[name] for image in ordered]
                batch[name] = torch.cat(values) if name == "pixel_values" and patches else _stack(values)
        if self.standard_positions and any(each.images for each in processed):
            # TRL's standard batch holds each example's images twice: in its chosen row, then in its rejected row.
            grids = [image.fields["image_grid_thw"] for each in processed for image in each.images]
            shared["standard_image_grid_thw"] = torch.stack(grids + grids)
        if self.bidirectional_images:
            index = torch.arange(keys.shape[1]).expand_as(keys)
            shared["visible_from"] = torch.where(is_image, index - key_index(keys), shared["visible_from"])
        batch["shared_inputs"] = shared
        return batch


def multimodal_positions(
    model: PreTrainedModel, shared: dict[str, torch.Tensor], standard_ids: torch.Tensor, standard_mask: torch.Tensor
) -> torch.Tensor:
    """``(3, rows, length)`` rotary positions of the shared layout for models with multimodal (temporal, height,
    width) positions: every token's from TRL's standard layout, where the model's own ``get_rope_index`` computes
    them, gathered through ``standard_index`` (padding keeps its text position on every axis). A token's standard
    position depends only on what comes before it, which the tokens a tree node stands for share."""
    image = (standard_ids == model.config.image_token_id).int()
    positions, _ = model.base_model.get_rope_index(
        standard_ids,
        mm_token_type_ids=image,
        image_grid_thw=shared.get("standard_image_grid_thw"),
        attention_mask=standard_mask,
    )
    index = shared["standard_index"]
    gathered = positions.flatten(1)[:, index.clamp(min=0)]
    return torch.where(index >= 0, gathered, shared["position_ids"].expand_as(gathered))


# Vision-language model types whose layout this module builds: how each attends within an image, and whether its
# rotary positions are multimodal. Others train on TRL's standard layout rather than risk a wrong mask or position
# (Gemma 4, for one, attends within images both ways in its sliding layers only, and shares keys across layers).
VISION_MODEL_TYPES = {
    # model_type: (image tokens see each other both ways, multimodal rotary positions from `get_rope_index`)
    "gemma3": (True, False),
    "llava": (False, False),
    "llava_next": (False, False),
    "qwen2_vl": (False, True),
    "qwen2_5_vl": (False, True),
    "qwen3_vl": (False, True),
}


def unknown_vision_layout(model: PreTrainedModel) -> str | None:
    """Why ``model`` cannot take the shared layout on vision data, or ``None`` for a model type it knows."""
    model_type = model.config.model_type
    if model_type in VISION_MODEL_TYPES:
        return None
    return (
        f"Model type '{model_type}' on vision data: how it attends within an image and positions image tokens is not "
        f"known to the shared layout, which knows {', '.join(sorted(VISION_MODEL_TYPES))}."
    )


def vision_collator_fields(model: PreTrainedModel, tokenizer) -> dict[str, Any]:
    """What :class:`PrefixSharingVisionCollator` needs to know about ``model``, of a type it knows."""
    bidirectional, rope = VISION_MODEL_TYPES[model.config.model_type]
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": model.config.image_token_id,
        "bidirectional_images": bidirectional,
        "standard_positions": rope,
    }


def vision_layout_examples(
    processor: ProcessorMixin, rows: Iterable[dict[str, Any]], image_token_id: int, max_length: int | None
) -> list[dict[str, Sequence[int]]]:
    """Raw vision examples as the layout takes them (prompts as layout keys), for packing and grouping, which plan
    from every example's tokens up front: each example's images are processed here once more than in training."""
    processed = (
        process_vision_example(processor, row, image_token_id, number, max_length) for number, row in enumerate(rows)
    )
    return [
        {"prompt_ids": e.prompt_keys, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in processed
    ]
