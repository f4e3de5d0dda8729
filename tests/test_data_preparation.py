"""Truncation and schema handling: our prepared tokens are trl.DPOTrainer's, cut by ``truncate_example``."""

import warnings

import pytest
from trl import DPOConfig, DPOTrainer

from embedded import load_tokenizer, make_preference_dataset, tiny_model
from preference_data import normalize_schema, truncate_example
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer


@pytest.mark.parametrize(
    "lengths, max_length, max_prompt_length, expected",
    [
        ((4, 3, 1), 10, None, (4, 3, 1)),  # fits: untouched
        ((4, 3, 1), 5, 3, (3, 2, 1)),  # prompt keeps its last 3 tokens, responses cut to the remaining 2
        ((4, 3, 1), 6, None, (4, 2, 1)),  # no max_prompt_length: only responses are cut
        ((2, 9, 9), 6, 3, (2, 4, 4)),  # a short prompt is not cut
        ((6, 3, 1), 6, None, None),  # the prompt alone fills max_length: dropped
    ],
)
def test_truncate_example(lengths, max_length, max_prompt_length, expected):
    prompt, chosen, rejected = (list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths))
    fitted = truncate_example(prompt, chosen, rejected, max_length, max_prompt_length)
    if expected is None:
        assert fitted is None
        return
    assert tuple(map(len, fitted)) == expected
    assert fitted[0] == prompt[len(prompt) - expected[0] :]  # the prompt's end is kept
    assert fitted[1] == chosen[: expected[1]] and fitted[2] == rejected[: expected[2]]


COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def _prepared(dataset, tmp_path, **config):
    args = PrefixDPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, prefix_sharing=True, **config)
    trainer = PrefixDPOTrainer(
        model=tiny_model("llama"), ref_model=tiny_model("llama"), args=args, train_dataset=dataset,
        processing_class=load_tokenizer(),
    )  # fmt: skip
    return trainer.train_dataset


def _trl_prepared(dataset, tmp_path):
    """trl.DPOTrainer's tokens, untruncated (its collator truncates, per batch)."""
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer(
            model=tiny_model("llama"), ref_model=tiny_model("llama"), args=args,
            train_dataset=normalize_schema(dataset), processing_class=load_tokenizer(),
        ).train_dataset  # fmt: skip


def test_prepared_tokens_are_trls_cut_by_the_truncation_rule(tmp_path):
    dataset = make_preference_dataset(24)
    ours = _prepared(dataset, tmp_path, max_length=256, max_prompt_length=192)
    trl = _trl_prepared(dataset, tmp_path)
    expected = [
        dict(zip(COLUMNS, truncate_example(*example, max_length=256, max_prompt_length=192), strict=True))
        for example in zip(*(trl[column] for column in COLUMNS), strict=True)
    ]
    assert ours.select_columns(COLUMNS).to_list() == expected
    assert len(ours) == 24  # max_prompt_length truncates long prompts instead of dropping them
    assert max(len(p) + max(len(c), len(r)) for p, c, r in zip(*(ours[c] for c in COLUMNS), strict=True)) <= 256
    # A prompt is cut to its last 192 tokens only where prompt + the longer response overflow 256.
    assert 192 in [len(p) for p in ours["prompt_ids"]]
    assert any(len(p) > 192 for p in trl["prompt_ids"]) and any(len(p) < 192 for p in ours["prompt_ids"])


def test_long_prompts_dropped_without_max_prompt_length(tmp_path):
    dataset = make_preference_dataset(24)
    with pytest.warns(UserWarning, match="examples dropped"):
        prepared = _prepared(dataset, tmp_path, max_length=200)
    assert 0 < len(prepared) < 24


def test_capybara_schema_trains_on_the_whole_shared_conversation(tmp_path):
    """The Capybara `prompt` (first user turn only) is dropped; the shared prefix is every common turn."""
    capybara = make_preference_dataset(8)
    assert isinstance(capybara[0]["prompt"], str) and isinstance(capybara[0]["chosen"], list)
    ours = _prepared(capybara, tmp_path, max_length=None)
    trl = _trl_prepared(capybara, tmp_path)
    assert ours.select_columns(COLUMNS).to_list() == trl.select_columns(COLUMNS).to_list()
    tokenizer = load_tokenizer()
    for example, raw in zip(ours, capybara, strict=True):
        shared_turns = raw["chosen"][:-1]
        assert len(shared_turns) >= 1
        # Every shared turn, not only the first user turn, is in the shared prompt.
        assert shared_turns[-1]["content"].strip() in tokenizer.decode(example["prompt_ids"])
