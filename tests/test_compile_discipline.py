"""FlexAttention stays compiled: static packed shapes, masks that capture only id tensors, a bounded number of
compiled variants, and a warning when dynamo gives up on flex_attention (CPU: flex_attention's forward only)."""

import pytest
import torch
from datasets import Dataset
from dpo_harness import assert_same_step, conversational_rows, make_trainers, plain_text_rows, train_step
from test_packing import packing_length_for
from trl import DPOTrainer

import flex_compile_watchdog
import prefix_dpo_trainer
import shared_layout
from collators import PrefixSharingCollator, block_mask
from embedded import load_tokenizer, tiny_model
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer
from shared_layout import cached_attention_mask

SHORT = {"prompt_words": (10, 60), "response_words": (3, 20), "turns": (1, 2)}


@pytest.fixture
def fresh_warnings():
    """The watchdog warns once per process; each test starts as if nothing had been said."""
    flex_compile_watchdog.forget_warnings()
    yield
    flex_compile_watchdog.forget_warnings()


def shapes(loader) -> set[tuple[int, ...]]:
    return {tuple(batch["shared_inputs"]["input_ids"].shape) for batch in loader}


def test_packed_batches_have_one_shape_short_last_batch_included(tmp_path):
    dataset = conversational_rows(9)
    length = packing_length_for(dataset, True)
    _, ours = make_trainers(dataset, packing_length=length, tmp_path=tmp_path)
    ours.data_collator.static_rows = True  # what a flex_attention model gets (on CPU the trainer runs sdpa)
    ours.args.per_device_train_batch_size = ours._train_batch_size = 3
    ours.args.per_device_eval_batch_size = 2
    train = list(ours.get_train_dataloader())
    rows_used = [int((batch["shared_inputs"]["sequence_ids"] >= 0).any(dim=1).sum()) for batch in train]
    assert min(rows_used) < 3, "the test needs a short batch"
    assert shapes(train) == {(3, length)}
    assert shapes(ours.get_eval_dataloader(ours.train_dataset)) == {(2, length)}


def test_short_unpacked_batch_is_padded_with_empty_rows(tmp_path):
    # 6 examples with 6 distinct prompts (pairs of one prompt would share a row), batches of 4 and 2.
    again = [{**row, "prompt": "Once more. " + row["prompt"]} for row in plain_text_rows()[:2]]
    dataset = Dataset.from_list(plain_text_rows() + again)
    _, ours = make_trainers(dataset, tmp_path=tmp_path)
    ours.args.per_device_train_batch_size = ours._train_batch_size = 4
    assert not ours.data_collator.static_rows, "dense masks compile nothing: no padding rows for sdpa"
    assert [len(batch["shared_inputs"]["input_ids"]) for batch in ours.get_train_dataloader()] == [4, 2]
    ours.data_collator.static_rows = True  # what a flex_attention model gets (on CPU the trainer runs sdpa)
    batches = list(ours.get_train_dataloader())
    assert [len(batch["input_ids"]) // 2 for batch in batches] == [4, 2]
    assert {batch["shared_inputs"]["input_ids"].shape[0] for batch in batches} == {4}
    last = batches[-1]["shared_inputs"]
    assert (last["sequence_ids"][2:] < 0).all() and last["score_index"].max() < 2 * last["input_ids"].shape[1]


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_empty_rows_carry_no_loss(packed):
    """A layout padded with empty rows gives TRL's loss, log-probs, gradients and metrics exactly."""
    dataset = conversational_rows(6)
    length = packing_length_for(dataset, True) if packed else None
    trl_trainer, ours = make_trainers(dataset, packing_length=length)
    rows = ours.data_collator([ours.train_dataset[i] for i in range(len(dataset))])["shared_inputs"]["input_ids"]
    ours.data_collator.batch_rows, ours.data_collator.static_rows = len(rows) + 2, True
    step = train_step(ours)
    assert step.batch["shared_inputs"]["input_ids"].shape[0] == len(rows) + 2
    assert_same_step(step, train_step(trl_trainer))


def test_mask_captures_only_id_tensors():
    collator = PrefixSharingCollator(pad_token_id=0)
    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [3, 4]},
        {"prompt_ids": [5], "chosen_ids": [8], "rejected_ids": [3, 4, 2]},
    ]
    shared = collator(examples)["shared_inputs"]
    for window in (None, 2):
        captured = [cell.cell_contents for cell in block_mask(shared, window).mask_mod.__closure__]
        assert all(isinstance(value, torch.Tensor) for value in captured), captured
        ids = [shared["visible_from"], shared["subtree_end"], shared["position_ids"]]
        assert all(any(value is tensor for value in captured) for tensor in ids)


def test_mask_is_built_once_per_batch_outside_the_batch():
    from embedded import tiny_model

    config = tiny_model("llama").config
    shared = PrefixSharingCollator(pad_token_id=0)(
        [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [3, 4]}]
    )["shared_inputs"]
    keys = set(shared)
    policy_mask = cached_attention_mask(shared, config, torch.float32)
    assert cached_attention_mask(shared, config, torch.float32) is policy_mask  # the reference forward's call
    assert set(shared) == keys, "the batch must stay plain data"
    copy = {name: value.clone() for name, value in shared.items()}
    assert cached_attention_mask(copy, config, torch.float32) is not policy_mask


def _flex_reference_forwards(ours, batches: list[list[int]]) -> None:
    ours.model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        for indices in batches:
            ours.compute_ref_log_probs(ours.model, ours.data_collator([ours.train_dataset[i] for i in indices]))


def test_flex_compiles_a_bounded_number_of_variants(fresh_compiler, fresh_warnings, recwarn):
    """Batches of many lengths and row counts, 128-token buckets as on GPU: the static first shape, then one
    dynamic variant, for each compiled function."""
    dataset = Dataset.from_list(plain_text_rows() * 3)
    _, ours = make_trainers(dataset)
    ours.data_collator.shared_pad_to_multiple_of = 128
    _flex_reference_forwards(ours, [[0], [1, 2], [3], [2, 3, 4], [5], [0, 7, 8, 9, 10, 11]])
    counts = flex_compile_watchdog.check_budget()
    assert 1 <= counts["flex_attention"] <= 2, counts
    assert not [str(w.message) for w in recwarn if w.category is RuntimeWarning], "the watchdog must stay quiet"


def test_watchdog_warns_when_flex_falls_back(fresh_compiler, fresh_warnings):
    dataset = Dataset.from_list(plain_text_rows())
    _, ours = make_trainers(dataset)
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        pytest.warns(RuntimeWarning, match=r"torch.compile gave up on flex_attention.*runs uncompiled"),
    ):
        _flex_reference_forwards(ours, [[0], [1, 2]])


def test_watchdog_warns_past_the_budget(fresh_compiler, fresh_warnings, monkeypatch):
    monkeypatch.setattr(flex_compile_watchdog, "COMPILE_BUDGET", 0)
    _, ours = make_trainers(Dataset.from_list(plain_text_rows()))
    _flex_reference_forwards(ours, [[0]])
    with pytest.warns(RuntimeWarning, match=r"flex_attention has been compiled 1 times in this process, past"):
        ours.compile_watchdog.on_step_end(ours.args, ours.state, ours.control)
    assert ours.compile_watchdog.counts["flex_attention"] == 1


def test_grouped_unpacked_batch_is_padded_to_a_power_of_two_of_its_rows():
    """Pairs of one prompt share a row: padding to the loader's batch size in pairs would be mostly empty rows."""
    example = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [3, 4]}
    others = [{**example, "prompt_ids": [5, 6, n]} for n in (10, 11)]
    collator = PrefixSharingCollator(pad_token_id=0, batch_rows=8, static_rows=True)
    shapes = [
        collator(examples)["shared_inputs"]["input_ids"].shape[0]
        for examples in ([example] * 8, [example] * 6 + others[:1], [example] * 5 + others)
    ]
    assert shapes == [1, 2, 4]
    assert collator([example, *others])["shared_inputs"]["input_ids"].shape[0] == 8  # no pairs share a prompt


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_every_loader_of_a_precomputed_flex_run_has_one_row_count(
    packed, fresh_compiler, fresh_warnings, monkeypatch, tmp_path
):
    """Precomputed reference log-probs, training and evaluation under flex_attention (its forward only: CPU has no
    flex backward). TRL's precompute loaders, which collate outside the trainer's ``_get_dataloader``, the train and
    the eval loader each hand batches of one row count, short last ones included, so flex_attention compiles its
    first shape and one variant with dynamic sizes, and no variant for a batch of one row (dynamo specializes 1)."""
    monkeypatch.setattr(shared_layout, "_fall_back_from_flex", lambda model, args: None)
    phase = ["init"]
    rows: dict[str, list[int]] = {}
    backbone = prefix_dpo_trainer.shared_backbone

    def recording_backbone(model, shared_inputs, *args):
        rows.setdefault(phase[0], []).append(len(shared_inputs["input_ids"]))
        return backbone(model, shared_inputs, *args)

    precompute = DPOTrainer._precompute_ref_logps

    def precompute_phase(self, dataset, name, batch_size):
        phase[0] = f"precompute {name}"
        return precompute(self, dataset, name, batch_size)

    monkeypatch.setattr(prefix_dpo_trainer, "shared_backbone", recording_backbone)
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", precompute_phase)
    train, evaluation = (conversational_rows(n, seed=n, **SHORT) for n in (9, 13))
    packing = {"enable_packing": True, "packing_length": str(packing_length_for(train, True))} if packed else {}
    args = PrefixDPOConfig(
        output_dir=str(tmp_path),
        prefix_sharing=True,
        precompute_ref_log_probs=True,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        max_length=None,
        bf16=False,
        report_to="none",
        **packing,
    )
    trainer = PrefixDPOTrainer(
        model=tiny_model("llama", attn_implementation="flex_attention"),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=load_tokenizer(),
    )
    assert trainer.model.config._attn_implementation == "flex_attention" and trainer.data_collator.static_rows
    phase[0] = "train"
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    phase[0] = "eval"
    trainer.evaluate()
    assert set(rows) == {"precompute train", "precompute eval", "train", "eval"}
    assert all(len(batches) > 1 for batches in rows.values()), "every loader must hand several batches"
    assert {name: len(set(batches)) for name, batches in rows.items()} == dict.fromkeys(rows, 1), rows
    assert flex_compile_watchdog.check_budget()["flex_attention"] <= 2
