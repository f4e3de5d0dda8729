"""Vision-language DPO with prefix sharing against TRL's own ``DPOTrainer`` (float32, CPU), per model family.

The batch mixes what vision preference data holds: pairs of one prompt and image (they share the prompt and the
image), a prompt with two images, a row without an image, and a prompt that repeats another's text before a
different image (they may share only the text before the image). Each family's tiny model and processor come from
``vision_models.py``.
"""

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import vision_models
from datasets import Dataset
from dpo_harness import (
    CONTEXT_SENSITIVE_INIT,
    assert_same_step,
    build_pair,
    flex_forward_errors,
    lora_config,
    perturbed_copy,
    train_step,
)
from peft import PeftConfig
from trl import DPOConfig, DPOTrainer
from vision_models import FAMILIES, IMAGE_SIZES, build, images, tower_inputs

import vision
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer


def message(role: str, text: str, image_count: int = 0) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "image"}] * image_count + [{"type": "text", "text": text}]}


def vision_rows(seed: int = 0) -> Dataset:
    """Six conversational pairs: 0 and 2 share question and image, 5 asks 0's question of another image, 3 holds two
    images, 4 none."""
    first, second, third, fourth, fifth = images(5, seed)
    rows = [
        ([first], "What is in this picture?", "A small red house by a lake.", "A dog."),
        (
            [second],
            "Describe the colours you see, from the top of the picture to the bottom.",
            "Blue, then green.",
            "Red.",
        ),
        ([first], "What is in this picture?", "A house.", "A tall grey tower on a hill, in the rain."),
        ([third, fourth], "How do these two differ?", "The first is darker.", "They are the same picture."),
        ([], "Name a colour that is not in the rainbow.", "Brown.", "Blue, which is in it."),
        ([fifth], "What is in this picture?", "Stripes.", "Nothing at all."),
    ]
    return Dataset.from_list(
        [
            {
                "images": pictures,
                "prompt": [message("user", question, len(pictures))],
                "chosen": [message("assistant", chosen)],
                "rejected": [message("assistant", rejected)],
            }
            for pictures, question, chosen, rejected in rows
        ]
    )


def make_vision_trainers(
    family: str,
    dataset: Dataset,
    attn_implementation: str = "sdpa",
    max_length: int | None = None,
    warn: bool = False,
    ours_attn_implementation: str | None = None,
    peft_config: PeftConfig | None = None,
    **ours: Any,
) -> tuple[DPOTrainer, PrefixDPOTrainer]:
    """TRL's trainer and ours on the same policy, reference (the policy with noise) and batch (the whole dataset);
    ``warn`` lets our trainer's warnings through; ``ours_attn_implementation`` gives ours another attention backend
    (flex_attention on a GPU); ``peft_config`` trains the same adapters on both sides against the policy with its
    adapters disabled (no reference model)."""
    policy, processor = build(family, initializer_range=CONTEXT_SENSITIVE_INIT)
    policy.set_attn_implementation(attn_implementation)
    reference = perturbed_copy(policy)

    def models(trainer_cls: type[DPOTrainer]) -> dict[str, Any]:
        model = copy.deepcopy(policy)
        reference_copy = None if peft_config is not None else copy.deepcopy(reference)
        if trainer_cls is PrefixDPOTrainer and ours_attn_implementation is not None:
            for each in (model, reference_copy):
                if each is not None:
                    each.set_attn_implementation(ours_attn_implementation)
        return dict(
            model=model,
            ref_model=reference_copy,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=peft_config,
        )

    common = dict(report_to="none", bf16=False, per_device_train_batch_size=len(dataset), max_length=max_length)
    trl_trainer, ours_trainer = build_pair(
        ((DPOTrainer, DPOConfig), (PrefixDPOTrainer, PrefixDPOConfig)),
        common,
        {"prefix_sharing": True, **ours},
        None,
        models,
        warn_ours=warn,
    )
    if peft_config is not None:  # the same random adapters on both sides
        ours_trainer.model.load_state_dict(trl_trainer.model.state_dict())
    return trl_trainer, ours_trainer


# transformers 5 runs Qwen-VL models on sdpa and eager only (their classes refuse flex_attention).
FLEX_FAMILIES = tuple(family for family in FAMILIES if not family.startswith("qwen"))

LAYOUTS = {
    "unpacked": {},
    "packed": {"enable_packing": True, "packing_length": "128"},  # two or three pairs a row
    "grouped": {"group_by_prefix": True},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_against_trl(family: str, layout: str) -> None:
    trl_trainer, ours = make_vision_trainers(family, vision_rows(), **LAYOUTS[layout])
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert "shared_inputs" in ours_step.batch
    assert_same_step(ours_step, trl_step)
    assert any("vision" in name or "visual" in name for name in trl_step.grads)


def tower_pixels(trainer: DPOTrainer) -> int:
    """Pixel values that reach the vision tower in one training step."""
    with tower_inputs(trainer.model) as shapes:
        train_step(trainer)
    return sum(math.prod(shape) for shape in shapes)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_sees_each_prompt_image_once(family: str) -> None:
    """Three pairs, two of them on one image: TRL's collator sends six images through the tower (each pair's, for
    chosen and for rejected), the shared layout two."""
    picture, *_, other = images(len(IMAGE_SIZES) + 1, seed=1)  # two images of one size
    rows = [
        {"images": [picture], "prompt": [message("user", "What is it?", 1)]},
        {"images": [picture], "prompt": [message("user", "What is it?", 1)]},
        {"images": [other], "prompt": [message("user", "What is it?", 1)]},
    ]
    for number, row in enumerate(rows):
        row["chosen"], row["rejected"] = [message("assistant", f"A thing {number}.")], [message("assistant", "No.")]
    trl_trainer, ours = make_vision_trainers(family, Dataset.from_list(rows))
    assert tower_pixels(ours) * 3 == tower_pixels(trl_trainer)


def test_a_merge_of_different_images_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: every image gets one digest, so prompts that differ only in their images merge, and one image's
    features stand in for the others' (LLaVA: every image takes the same number of tokens, so nothing else breaks)."""
    monkeypatch.setattr("vision._digest", lambda fields: 0)
    trl_trainer, ours = make_vision_trainers("llava", vision_rows())
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_lora_is_exact(family: str) -> None:
    """LoRA on every linear layer, the vision tower's too, packed; the reference is the policy without adapters."""
    trl_trainer, ours = make_vision_trainers(family, vision_rows(), peft_config=lora_config(), **LAYOUTS["packed"])
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert any("lora" in name and ("visual" in name or "vision_tower" in name) for name in trl_step.grads)
    assert_same_step(ours_step, trl_step)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_additive_mask_is_exact(family: str) -> None:
    """Eager attention adds the mask to the scores: the shared layout's mask as an additive float one."""
    trl_trainer, ours = make_vision_trainers(family, vision_rows(), attn_implementation="eager", **LAYOUTS["packed"])
    assert_same_step(train_step(ours), train_step(trl_trainer))


@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_forward_is_exact(family: str, fresh_compiler) -> None:
    """FlexAttention has no backward on CPU: its BlockMask is checked on the forward, the sequence log-probs."""
    trl_trainer, ours = make_vision_trainers(family, vision_rows(), **LAYOUTS["packed"])
    chosen_error, rejected_error = flex_forward_errors(trl_trainer, ours)
    assert chosen_error <= 1e-5 and rejected_error <= 1e-5, (chosen_error, rejected_error)


def test_prompt_that_fills_max_length_is_an_error_naming_the_row() -> None:
    """TRL would cut such a prompt, and an image in it, and train on no response token; the collator names the row."""
    trl_trainer, ours = make_vision_trainers(FAMILIES[0], vision_rows(), max_length=12)
    examples = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
    with pytest.raises(ValueError, match=r"Example 0: its prompt takes \d+ tokens \(images included\), not fewer"):
        ours.data_collator(examples)


def test_responses_are_cut_as_trl_cuts_them() -> None:
    """``max_length`` between the longest prompt and the longest sequence: TRL keeps each sequence's first
    ``max_length`` tokens, and so does the shared layout."""
    dataset = vision_rows()
    token_id = vision_models.config(FAMILIES[0]).image_token_id
    lengths = [
        vision.process_vision_example(vision_models.processor(FAMILIES[0]), row, token_id, 0, None) for row in dataset
    ]
    longest_prompt = max(len(example.prompt_ids) for example in lengths)
    trl_trainer, ours = make_vision_trainers(FAMILIES[0], dataset, max_length=longest_prompt + 2)
    assert_same_step(train_step(ours), train_step(trl_trainer))


def test_image_in_a_response_is_an_error_naming_the_row() -> None:
    dataset = vision_rows()
    rows = [dataset[i] for i in range(len(dataset))]
    rows[1]["chosen"] = [message("assistant", "Like this one:", 1)]
    _, ours = make_vision_trainers(FAMILIES[0], dataset)
    with pytest.raises(ValueError, match="Example 1"):
        ours.data_collator(rows)


def test_more_placeholders_than_images_is_an_error() -> None:
    dataset = vision_rows()
    rows = [dataset[i] for i in range(len(dataset))]
    rows[3]["images"] = rows[3]["images"][:1]
    _, ours = make_vision_trainers(FAMILIES[0], vision_rows())
    with pytest.raises(ValueError, match=r"Example 3: .*image"):
        ours.data_collator(rows)


@pytest.mark.parametrize("family", [family for family in FAMILIES if family.startswith("qwen")])
def test_text_positions_for_image_tokens_are_caught(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: the layout's text positions (its depths) on every rotary axis, as a model without multimodal
    positions takes them: image tokens lose their height and width, and the text after an image its offset."""
    monkeypatch.setattr("prefix_dpo_trainer.multimodal_positions", lambda model, shared, *_: shared["position_ids"])
    trl_trainer, ours = make_vision_trainers(family, vision_rows())
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)


def test_causal_image_tokens_are_caught() -> None:
    """Mutation: Gemma 3's image tokens attend causally, as text does, instead of both ways within each image."""
    trl_trainer, ours = make_vision_trainers("gemma3", vision_rows())
    ours.data_collator.bidirectional_images = False
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    with pytest.raises(AssertionError):
        assert_same_step(ours_step, trl_step)


def test_an_unknown_vision_model_type_trains_on_trls_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model type whose image attention and positions the layout does not know (Gemma 4, say; here LLaVA, made
    unknown) keeps TRL's collator and forward, with one warning naming it, and is exact."""
    monkeypatch.delitem(vision.VISION_MODEL_TYPES, "llava")
    with pytest.warns(UserWarning, match="Model type 'llava' on vision data"):
        trl_trainer, ours = make_vision_trainers("llava", vision_rows(), warn=True)
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert "shared_inputs" not in ours_step.batch
    assert_same_step(ours_step, trl_step)


def test_cli_trains_a_vision_model_from_disk(tmp_path, capsys) -> None:
    """`train_dpo.py --model_name_or_path <dir> --dataset_name <parquet> --prefix_sharing` on a saved LLaVA and a
    vision dataset file: TRL loads the model and processor, the shared layout runs (tokens saved)."""
    from test_cli import parse

    import train_dpo

    model, processor = build("llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    vision_rows().to_parquet(tmp_path / "pairs.parquet")
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "pairs.parquet")]
    argv += ["--output_dir", str(tmp_path / "run"), "--prefix_sharing", "--max_steps", "1", "--eval_strategy", "no"]
    argv += ["--per_device_train_batch_size", "3", "--attn_implementation", "sdpa", "--report_to", "none"]
    train_dpo.main(*parse(argv))
    summary = capsys.readouterr().out
    assert "prefix sharing:                     on" in summary
    saved = re.search(r"\((\d+\.\d)% saved\)", summary)
    assert saved is not None and float(saved.group(1)) > 0, summary


def test_standard_format_is_exact() -> None:
    """TRL's standard (not conversational) vision format: the prompt's text holds the processor's image token."""
    first, second = images(2, seed=2)
    token = vision_models.processor("llava").image_token
    rows = [
        {"images": [first], "prompt": f"{token} What is it?", "chosen": " A cat.", "rejected": " A dog on a mat."},
        {"images": [first], "prompt": f"{token} What is it?", "chosen": " A cat, asleep.", "rejected": " Nothing."},
        {"images": [second], "prompt": f"Two: {token} and", "chosen": " nothing else.", "rejected": " more."},
    ]
    trl_trainer, ours = make_vision_trainers("llava", Dataset.from_list(rows))
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert "shared_inputs" in ours_step.batch
    assert_same_step(ours_step, trl_step)


def test_vision_benchmark_smoke(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmark/vision_shape.py end to end on a few small examples: the report is written, and the shared layouts
    feed the vision tower half of what TRL's path does."""
    import json
    import runpy

    benchmark = Path(__file__).resolve().parent.parent / "benchmark"
    monkeypatch.syspath_prepend(str(benchmark))  # as when run as a script: its neighbours (report.py) import
    main = runpy.run_path(str(benchmark / "vision_shape.py"))["main"]
    small = ["--examples", "3", "--repeats", "1", "--hidden", "64", "--layers", "1", "--image-size", "32"]
    main([*small, "--batch-size", "2", "--output", str(tmp_path / "vision")])
    runs = json.loads((tmp_path / "vision.json").read_text())["runs"]
    assert (tmp_path / "vision.md").exists()
    for config in ("sharing", "sharing+packing"):
        assert 2 * runs[config][0]["tower_rows"] == runs["trl"][0]["tower_rows"]
        assert runs[config][0]["tokens"] < runs["trl"][0]["tokens"]
