"""Packed rows (with and without prefix sharing) against trl.DPOTrainer on the same examples, float32 on CPU, and
FlexAttention's forward on them. The mutation tests show that these comparisons fail when packed documents see each
other or the BlockMask is wrong."""

import mutations
import pytest
import torch
from datasets import Dataset
from dpo_harness import (
    assert_flex_forward_matches,
    assert_same_metrics,
    assert_same_step,
    conversational_rows,
    conversations,
    flex_forward_errors,
    leaves,
    make_trainers,
    plain_text_rows,
    train_step,
)

from collators import BLOCK, shared_sequence_length


def packing_length_for(dataset: Dataset, prefix_sharing: bool) -> int:
    """Room for about two examples per row, so a batch spans several rows and rows hold several examples."""
    _, ours = make_trainers(dataset, prefix_sharing=prefix_sharing)
    lengths = [shared_sequence_length(example, prefix_sharing) for example in ours.train_dataset]
    return max(max(lengths), 2 * sorted(lengths)[len(lengths) // 2])


def assert_packs_several_examples(shared: dict[str, torch.Tensor]) -> None:
    """Some row holds two examples or more: four sequences or more end there (with prefix sharing all of a row's
    sequences start with BOS, so the row is one tree)."""
    assert int(leaves(shared).sum(1).max()) >= 4


def compare_packed(dataset: Dataset, prefix_sharing: bool, **kwargs) -> None:
    length = packing_length_for(dataset, prefix_sharing)
    trl_trainer, ours = make_trainers(dataset, prefix_sharing=prefix_sharing, packing_length=length, **kwargs)
    ours_step = train_step(ours)
    shared = ours_step.batch["shared_inputs"]
    rows = shared["input_ids"].shape[0]
    assert shared["input_ids"].shape[1] == length  # every row padded to exactly the packing length
    assert 1 < rows < len(dataset), "the test must pack several examples into each of several rows"
    assert_packs_several_examples(shared)
    assert_same_step(ours_step, train_step(trl_trainer))


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_packed_rows(prefix_sharing, data):
    dataset = conversational_rows(8) if data == "conversational" else Dataset.from_list(plain_text_rows() * 2)
    compare_packed(dataset, prefix_sharing)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_packed_loss_types(loss_type):
    compare_packed(Dataset.from_list(plain_text_rows() * 2), True, loss_type=[loss_type])


@pytest.mark.parametrize("config", [{"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, {"ld_alpha": 0.5}])
def test_packed_loss_options(config):
    compare_packed(Dataset.from_list(plain_text_rows() * 2), True, **config)


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared", "unshared"])
def test_packed_precomputed_reference(prefix_sharing, tmp_path):
    compare_packed(conversational_rows(8), prefix_sharing, reference="precompute", tmp_path=tmp_path)


@pytest.mark.parametrize(
    "model_type, overrides, prefix_sharing",
    [
        pytest.param("llama", {}, True, id="llama-shared"),
        pytest.param("llama", {}, False, id="llama-unshared"),
        pytest.param("mistral", {"sliding_window": 24}, True, id="mistral-sliding-window-shared"),
    ],
)
def test_packed_flex_attention_forward(model_type, overrides, prefix_sharing, fresh_compiler):
    """FlexAttention's BlockMask on packed rows of several blocks, where documents meet inside blocks (forward only:
    no CPU backward)."""
    dataset = conversational_rows(8)
    trl_trainer, ours = make_trainers(
        dataset,
        model_type=model_type,
        model_overrides=overrides,
        prefix_sharing=prefix_sharing,
        packing_length=packing_length_for(dataset, prefix_sharing),
    )
    shared = ours.data_collator(list(ours.train_dataset))["shared_inputs"]
    assert shared["input_ids"].shape[1] > 2 * BLOCK
    assert_packs_several_examples(shared)
    assert_flex_forward_matches(trl_trainer, ours)


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_comparison_fails_when_a_packed_document_sees_the_one_before(attn_implementation, prefix_sharing, monkeypatch):
    dataset = Dataset.from_list(plain_text_rows() * 2)
    trl_trainer, ours = make_trainers(
        dataset,
        attn_implementation=attn_implementation,
        prefix_sharing=prefix_sharing,
        packing_length=packing_length_for(dataset, prefix_sharing),
    )
    trl_step = train_step(trl_trainer)
    mutations.documents_see_the_one_before(monkeypatch)
    mutations.assert_caught(train_step(ours), trl_step)


@pytest.mark.parametrize("mutation", [mutations.partial_blocks_full, mutations.mask_mod_reaches_one_further])
def test_flex_comparison_fails_on_a_wrong_block_mask(mutation, monkeypatch, fresh_compiler):
    """Rows of two blocks, where documents and responses start and end mid-block."""
    dataset = Dataset.from_list(plain_text_rows() * 2)
    trl_trainer, ours = make_trainers(dataset, packing_length=packing_length_for(dataset, True))
    mutation(monkeypatch)
    assert max(flex_forward_errors(trl_trainer, ours)) > mutations.CAUGHT
    with pytest.raises(AssertionError):
        assert_flex_forward_matches(trl_trainer, ours)


def test_packing_logs_efficiency():
    dataset = conversational_rows(8)
    _, ours = make_trainers(dataset, packing_length=packing_length_for(dataset, True))
    step = train_step(ours)
    shared = step.batch["shared_inputs"]
    expected = (shared["sequence_ids"] >= 0).sum().item() / shared["sequence_ids"].numel()
    assert step.metrics["packing/efficiency"] == pytest.approx(expected)
    assert step.metrics["packing/examples_per_row"] == pytest.approx(len(dataset) / shared["input_ids"].shape[0])


def test_example_longer_than_packing_length_names_it():
    dataset = conversational_rows(6)
    _, ours = make_trainers(dataset)
    lengths = [shared_sequence_length(example) for example in ours.train_dataset]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    with pytest.raises(ValueError, match=rf"Example {longest} of the train dataset takes {lengths[longest]} tokens"):
        make_trainers(dataset, packing_length=lengths[longest] - 1)


def test_packed_training_loop_uses_every_example_once(tmp_path):
    """Through Trainer's own dataloader: the packed batch sampler, one epoch, every example exactly once."""
    dataset = conversational_rows(12)
    length = packing_length_for(dataset, True)
    _, ours = make_trainers(dataset, packing_length=length, tmp_path=tmp_path)
    ours.args.per_device_train_batch_size = ours._train_batch_size = 1
    seen = []
    for batch in ours.get_train_dataloader():
        assert batch["shared_inputs"]["input_ids"].shape == (1, length)
        half = len(batch["input_ids"]) // 2  # chosen rows: prompt + chosen, padding stripped
        seen += [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(batch["input_ids"][:half], batch["attention_mask"][:half], strict=True)
        ]
    expected = [tuple(example["prompt_ids"] + example["chosen_ids"]) for example in ours.train_dataset]
    assert sorted(seen) == sorted(expected)


def test_packed_evaluation_matches_trl(tmp_path):
    """Evaluation goes through the packed batch sampler (unshuffled, several batches) and logs TRL's metrics, as
    trl.DPOTrainer's evaluation logs them on the same batches of examples (it cannot pack, so it is given our plan of
    batches), and the packing metrics."""
    dataset = conversations(8)
    trl_trainer, ours = make_trainers(
        dataset, packing_length=packing_length_for(dataset, True), tmp_path=tmp_path, per_device_eval_batch_size=1
    )
    assert ours.train_dataset.to_list() == trl_trainer.train_dataset.to_list()
    examples_per_batch = [len(batch["input_ids"]) // 2 for batch in ours.get_eval_dataloader(ours.train_dataset)]
    assert sum(examples_per_batch) == len(dataset) and 1 < len(examples_per_batch) < len(dataset)
    trl_trainer._get_eval_sampler = ours._get_eval_sampler
    metrics = ours.evaluate(ours.train_dataset)
    assert_same_metrics(metrics, trl_trainer.evaluate(trl_trainer.train_dataset))
    assert 0 < metrics["eval_packing/efficiency"] <= 1
    assert metrics["eval_packing/examples_per_row"] == pytest.approx(len(dataset) / len(examples_per_batch))


def test_auto_packing_length(capsys):
    """The default `--packing_length auto` resolves from the training set and says how."""
    dataset = conversational_rows(8)
    _, ours = make_trainers(dataset, packing_length="auto")
    lengths = [shared_sequence_length(example) for example in ours.train_dataset]
    assert isinstance(ours.args.packing_length, int) and ours.args.packing_length >= max(lengths)
    assert ours.args.packing_length % 128 == 0
    assert "--packing_length auto:" in capsys.readouterr().out
    assert_same_step(train_step(ours), train_step(make_trainers(dataset)[0]))
