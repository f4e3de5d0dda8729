"""Tiny offline vision-language models and matching processors, one per supported family.

Each family gets a float32 model with a two-layer text tower of the project's tiny sizes (``tiny_model_config``)
and a tiny vision tower, and a processor built from the shipped tokenizer with the family's image tokens added. Images
are a few dozen pixels a side and give 4 to 16 placeholder tokens each, so a batch of conversations with images runs
in well under a second on a CPU. Nothing is downloaded: the processors use transformers' PIL image processors, since
torchvision (which the default image and video processors need) cannot be installed beside the CPU build of torch.

``build(family)`` returns ``(model, processor)``; ``images(n, seed)`` gives deterministic PIL images of mixed content
and of several sizes, so that image token counts (Qwen grids, LLaVA-NeXT's any-resolution tiles) differ between them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from embedded import TOKENIZER_DIR, tiny_model_config

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "llava_next")

# (width, height) of the images ``images`` cycles through: square, wide and tall, so that Qwen's grids are not all
# square (its 3D positions then differ in height and width) and LLaVA-NeXT picks different tile layouts.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (48, 32), (32, 64))

_VISION_HIDDEN = 32
# Qwen: 8-pixel patches merged 2x2, so a 32x32 image is a 4x4 patch grid and 4 placeholder tokens.
_QWEN_PATCH = 8
_QWEN_MERGE = 2
# Gemma 3 and LLaVA: one fixed 32x32 input per image (images are resized), patches of 8 pixels (a 4x4 grid).
_FIXED_IMAGE = 32
_FIXED_PATCH = 8
_GEMMA3_TOKENS_PER_IMAGE = 4  # the 4x4 patch grid average-pooled to 2x2
# LLaVA-NeXT: 32-pixel tiles of 16-pixel patches (2x2 features each), the base tile plus a layout from these.
_LLAVA_NEXT_PATCH = 16
_LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]

_IMAGE_TOKENS: dict[str, dict[str, str]] = {
    "qwen": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    "llava": {"image_token": "<image>"},
}
# What the chat template writes for an image; the processor then expands it to the family's image token sequence.
_TEMPLATE_IMAGE = {
    "qwen": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "llava": "<image>",
}


def _token_group(family: str) -> str:
    return "qwen" if family.startswith("qwen") else "llava" if family.startswith("llava") else family


def _chat_template(image_text: str) -> str:
    """The project's chat template (``embedded.CHAT_TEMPLATE``) extended to TRL's multimodal messages, whose contents
    are lists of ``{"type": "image"}`` and ``{"type": "text"}`` blocks; plain string contents still work, so the
    same processor renders text-only rows. Text blocks are trimmed as the text template trims contents, which keeps
    the prompt an exact prefix of prompt + completion."""
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception('Unsupported role: ' + message['role']) -}}"
        "{%- endif -%}"
        "{{- '<|' + message['role'] + '|>\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- '{image_text}' -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '<|end|>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    )


def tokenizer(family: str) -> PreTrainedTokenizerBase:
    """The shipped tokenizer with ``family``'s image tokens appended to its vocabulary as named special tokens
    (``tokenizer.image_token`` / ``image_token_id`` and so on, which the processors read)."""
    _check_family(family)
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), **_IMAGE_TOKENS[_token_group(family)])


def _image_only(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_cls`` (a Qwen processor) without its video processor.

    ProcessorMixin takes its sub-processors from ``__init__``'s parameters and type-checks each; without torchvision
    the video processor class is a placeholder, so even ``video_processor=None`` fails the check. Leaving the
    parameter out of the signature drops the video processor; the parent's ``__init__`` still sets the video token
    attributes, which only videos (never passed here) use.
    """

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"{processor_cls.__name__}ImageOnly", (processor_cls,), {"__init__": __init__})


_QWEN_PROCESSORS = {
    "qwen2_vl": _image_only(Qwen2VLProcessor),
    "qwen2_5_vl": _image_only(Qwen2_5_VLProcessor),
    "qwen3_vl": _image_only(Qwen3VLProcessor),
}


def processor(family: str) -> ProcessorMixin:
    """The processor of ``family`` for the tiny model of ``build``: its image sizes and token counts match the
    model's vision tower."""
    _check_family(family)
    tok = tokenizer(family)
    template = _chat_template(_TEMPLATE_IMAGE[_token_group(family)])
    if family in _QWEN_PROCESSORS:
        # Images at their own size (rounded to whole merged patches): any 16x16 to 64x64 image passes unscaled.
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=_QWEN_PATCH,
            merge_size=_QWEN_MERGE,
            temporal_patch_size=2,
            size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        )
        return _QWEN_PROCESSORS[family](image_processor=image_processor, tokenizer=tok, chat_template=template)
    if family == "gemma3":
        image_processor = Gemma3ImageProcessorPil(size={"height": _FIXED_IMAGE, "width": _FIXED_IMAGE})
        return Gemma3Processor(image_processor, tok, chat_template=template, image_seq_length=_GEMMA3_TOKENS_PER_IMAGE)
    if family == "llava":
        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": _FIXED_IMAGE}, crop_size={"height": _FIXED_IMAGE, "width": _FIXED_IMAGE}
        )
        return LlavaProcessor(
            image_processor,
            tok,
            patch_size=_FIXED_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops again
            chat_template=template,
        )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _FIXED_IMAGE},
        crop_size={"height": _FIXED_IMAGE, "width": _FIXED_IMAGE},
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor,
        tok,
        patch_size=_LLAVA_NEXT_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def _text_sizes(vocab_size: int) -> dict[str, Any]:
    """The project's tiny text sizes and token ids, for text configs that ``tiny_model_config`` does not build."""
    llama = tiny_model_config("llama", vocab_size=vocab_size)
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    )
    return {key: getattr(llama, key) for key in keys}


def config(family: str, **text_overrides: Any) -> PretrainedConfig:
    """The tiny config of ``family``, its image token ids those of ``tokenizer(family)``; ``text_overrides`` go to
    the text config (e.g. ``sliding_window`` or ``layer_types`` for Gemma 3)."""
    _check_family(family)
    tok = tokenizer(family)
    text = {**_text_sizes(len(tok)), **text_overrides}
    if family in _QWEN_PROCESSORS:
        half_rotary = text["head_dim"] // 2
        # Multimodal RoPE splits the rotary frequencies into (temporal, height, width) sections that must cover them.
        sections = [half_rotary - 2 * (half_rotary // 3), *[half_rotary // 3] * 2]
        mrope = {"rope_type": "default", "mrope_section": sections}
        ids = {
            "image_token_id": tok.image_token_id,
            "video_token_id": tok.video_token_id,
            "vision_start_token_id": tok.vision_start_token_id,
            "vision_end_token_id": tok.vision_end_token_id,
        }
        vision = {
            "depth": 2,
            "hidden_size": _VISION_HIDDEN,
            "num_heads": 2,
            "patch_size": _QWEN_PATCH,
            "spatial_merge_size": _QWEN_MERGE,
            "temporal_patch_size": 2,
        }
    if family == "qwen2_vl":
        vision = {**vision, "embed_dim": _VISION_HIDDEN, "hidden_size": text["hidden_size"], "mlp_ratio": 2}
        return Qwen2VLConfig(text_config={**text, "rope_parameters": mrope}, vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        # A 16-pixel window (2x2 patches) in block 0 and full attention in block 1, so both paths run.
        vision = {
            **vision,
            "intermediate_size": 2 * _VISION_HIDDEN,
            "out_hidden_size": text["hidden_size"],
            "window_size": 2 * _QWEN_PATCH * _QWEN_MERGE,
            "fullatt_block_indexes": [1],
        }
        return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": mrope}, vision_config=vision, **ids)
    if family == "qwen3_vl":
        # Position embeddings of an 8x8 patch grid (interpolated to each image's grid); DeepStack from block 0.
        vision = {
            **vision,
            "intermediate_size": 2 * _VISION_HIDDEN,
            "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
        text = {**text, "rope_parameters": {**mrope, "mrope_interleaved": True}}
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "gemma3":
        # Layer 0 sliding (the window shorter than most test sequences), layer 1 global, as Gemma 3 interleaves them.
        text = {
            "query_pre_attn_scalar": text["head_dim"],
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            **text,
        }
        vision = SiglipVisionConfig(**_vision_tower(_FIXED_IMAGE, _FIXED_PATCH, layers=1))
        return Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=_GEMMA3_TOKENS_PER_IMAGE,
            image_token_index=tok.image_token_id,
            boi_token_index=tok.boi_token_id,
            eoi_token_index=tok.eoi_token_id,
        )
    text_config = tiny_model_config("llama", vocab_size=len(tok), **text_overrides)
    if family == "llava":
        vision = CLIPVisionConfig(**_vision_tower(_FIXED_IMAGE, _FIXED_PATCH, layers=2))
        return LlavaConfig(
            text_config=text_config,
            vision_config=vision,
            image_token_index=tok.image_token_id,
            image_seq_length=(_FIXED_IMAGE // _FIXED_PATCH) ** 2,
        )
    vision = CLIPVisionConfig(**_vision_tower(_FIXED_IMAGE, _LLAVA_NEXT_PATCH, layers=2))
    return LlavaNextConfig(
        text_config=text_config,
        vision_config=vision,
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        image_seq_length=(_FIXED_IMAGE // _LLAVA_NEXT_PATCH) ** 2,
    )


def _vision_tower(image_size: int, patch_size: int, layers: int) -> dict[str, Any]:
    """A SigLIP or CLIP vision tower of ``layers`` layers (LLaVA reads the second-to-last layer's features)."""
    return {
        "hidden_size": _VISION_HIDDEN,
        "intermediate_size": 2 * _VISION_HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}


def model(
    family: str, seed: int = 0, attn_implementation: str | None = None, **text_overrides: Any
) -> PreTrainedModel:
    """A float32 model of ``config(family, **text_overrides)``, identically initialized for a seed, in eval mode;
    the global torch RNG is forked, so building a model does not change the caller's random stream."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    family_config = config(family, **text_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = _MODEL_CLASSES[family]._from_config(family_config, dtype=torch.float32, **kwargs)
        if family == "gemma3":
            # Gemma 3 initializes its image projection to zero, which would feed the text model all-zero image
            # features: images would not change the logits, and tests of where image features go could not fail.
            projection = built.model.multi_modal_projector.mm_input_projection_weight
            with torch.no_grad():
                projection.normal_(std=family_config.text_config.initializer_range)
    return built.float().eval()


def build(
    family: str, seed: int = 0, attn_implementation: str | None = None, **text_overrides: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The tiny model of ``family`` and its processor (see ``model`` and ``processor``)."""
    return model(family, seed, attn_implementation, **text_overrides), processor(family)


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic RGB images cycling through ``IMAGE_SIZES``, each of one of three kinds of content (noise,
    a colour gradient, flat blocks) so that image features differ clearly between images."""
    rng = random.Random(seed)
    result = []
    for index in range(n):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        kind = rng.randrange(3)
        if kind == 0:
            pixels = bytes(rng.randrange(256) for _ in range(width * height * 3))
        elif kind == 1:
            base = [rng.randrange(256) for _ in range(3)]
            pixels = bytes(
                (base[c] + (x * 255 // width if c != 1 else y * 255 // height)) % 256
                for y in range(height)
                for x in range(width)
                for c in range(3)
            )
        else:
            colours = [[rng.randrange(256) for _ in range(3)] for _ in range(4)]
            pixels = bytes(
                colours[2 * (y * 2 // height) + x * 2 // width][c]
                for y in range(height)
                for x in range(width)
                for c in range(3)
            )
        result.append(Image.frombytes("RGB", (width, height), pixels))
    return result


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown vision-language family {family!r}; expected one of {FAMILIES}")


@contextlib.contextmanager
def tower_inputs(*models: torch.nn.Module) -> Iterator[list[torch.Size]]:
    """Inside, the shapes of the pixel values each vision tower of ``models`` is called with, in call order (a
    forward hook on every module named ``vision_tower`` or ``visual``)."""
    shapes: list[torch.Size] = []

    def record(module, args, kwargs, output) -> None:
        shapes.append((args[0] if args else kwargs["pixel_values"]).shape)

    towers = [m for model in models for name, m in model.named_modules() if name.endswith(("vision_tower", "visual"))]
    handles = [tower.register_forward_hook(record, with_kwargs=True) for tower in towers]
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()
