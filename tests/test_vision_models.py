"""The tiny vision-language fixtures work with TRL as its DPO trainer uses them: the vision collator batches
conversations with zero, one or two images, the model reads the images, and TRL's fused LM head and a training step
run on them."""

import warnings
from typing import Any

import pytest
import torch
import vision_models
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.utils import add_fused_lm_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def examples(seed: int = 0) -> list[dict[str, Any]]:
    """One image, two images of other sizes, and no image (a text-only row in a vision batch)."""
    first, second, third = vision_models.images(3, seed)
    return [
        {
            "images": [first],
            "prompt": [{"role": "user", "content": "What is in this picture?"}],
            "chosen": [{"role": "assistant", "content": "A red square on a blue field."}],
            "rejected": [{"role": "assistant", "content": "A cat."}],
        },
        {
            "images": [second, third],
            "prompt": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Compare the two images."},
            ],
            "chosen": [{"role": "assistant", "content": "The first is wider."}],
            "rejected": [{"role": "assistant", "content": "They are the same image in every way."}],
        },
        {
            "images": [],
            "prompt": [{"role": "user", "content": "Name a colour."}],
            "chosen": [{"role": "assistant", "content": "Green."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
    ]


def collate(processor, seed: int = 0) -> dict[str, torch.Tensor]:
    return DataCollatorForVisionPreference(processor)(examples(seed))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What TRL's DPO trainer passes to the model: the batch without its loss-side keys."""
    return {key: value for key, value in batch.items() if key != "completion_mask"}


@pytest.mark.parametrize("family", vision_models.FAMILIES)
def test_config_matches_tokenizer(family):
    config = vision_models.config(family)
    tokenizer = vision_models.tokenizer(family)
    assert config.image_token_id == tokenizer.image_token_id
    assert config.get_text_config().vocab_size == len(tokenizer)
    if family == "gemma3":
        assert (config.boi_token_id, config.eoi_token_id) == (tokenizer.boi_token_id, tokenizer.eoi_token_id)
    if family.startswith("qwen"):
        assert config.vision_start_token_id == tokenizer.vision_start_token_id
        assert config.vision_end_token_id == tokenizer.vision_end_token_id


@pytest.mark.parametrize("family", vision_models.FAMILIES)
def test_collated_batch_runs_and_reads_the_images(family):
    """The collator's batch runs through the model as TRL's trainer calls it, and the logits depend on the images:
    other images of the same sizes (hence the same token layout) change every row that has an image and no other."""
    model, processor = vision_models.build(family)
    batch, other = collate(processor, seed=0), collate(processor, seed=1)
    assert torch.equal(batch["input_ids"], other["input_ids"])
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert (image_tokens[[0, 1, 3, 4]] > 0).all() and (image_tokens[[2, 5]] == 0).all()
    assert (image_tokens[[1, 4]] > image_tokens[[0, 3]]).all()
    if family.startswith("qwen"):
        assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == model.config.image_token_id)
    if family == "gemma3":
        assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == model.config.image_token_id)

    with torch.no_grad():
        logits = model(**model_inputs(batch), use_cache=False).logits
        other_logits = model(**model_inputs(other), use_cache=False).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()
    change = (logits - other_logits).abs().amax(dim=(1, 2))
    assert (change[[0, 1, 3, 4]] > 1e-4).all(), change
    assert (change[[2, 5]] == 0).all(), change


@pytest.mark.parametrize("family", vision_models.FAMILIES)
def test_fused_lm_head_matches_the_logits(family):
    """TRL's DPO trainer scores with ``add_fused_lm_head``; on these models its per-token log-probs are those of the
    model's own logits, with labels shifted by the head or pre-shifted (``shift_labels``)."""
    model, processor = vision_models.build(family)
    batch = collate(processor)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(**model_inputs(batch), use_cache=False).logits
        add_fused_lm_head(model)
        fused = model(**model_inputs(batch), labels=labels, fused_lm_head=True).log_probs
        shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        pre_shifted = model(**model_inputs(batch), shift_labels=shift_labels, fused_lm_head=True).log_probs
    targets = labels[:, 1:]
    expected = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(targets == -100, 0)
    assert (targets != -100).any(dim=1).all()
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pre_shifted[:, :-1], expected, rtol=1e-5, atol=1e-5)


def test_dpo_trainer_trains_a_step(tmp_path):
    """TRL's own DPO trainer takes an optimizer step on a vision data set with a text-only row, updating the vision
    tower as well as the language model."""
    model, processor = vision_models.build("qwen2_vl")
    rows = [*examples(0), *examples(1)[:1]]
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=len(rows),
        max_steps=1,
        learning_rate=1e-2,
        gradient_checkpointing=False,
        save_strategy="no",
        use_cpu=True,
    )
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=model,
            ref_model=vision_models.model("qwen2_vl", seed=1),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
        )
        trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert any(name.startswith("model.visual.") for name in changed), sorted(changed)[:5]
    assert any(name.startswith("model.language_model.") for name in changed), sorted(changed)[:5]
