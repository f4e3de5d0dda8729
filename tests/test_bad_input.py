"""Real-world datasets and bad input: every accepted schema trains on TRL's tokens; everything else is a clear error
at start-up, or a documented drop whose count is reported. See the rules in ``preference_data``'s docstring."""

import warnings
from typing import Any

import pytest
from datasets import Dataset
from dpo_harness import assert_same_step, make_trainers, relative_error, train_step
from trl import DPOConfig, DPOTrainer

from embedded import load_tokenizer, make_preference_dataset, tiny_model
from preference_data import (
    check_datasets_not_empty,
    finish_tokenized,
    hoist_shared_turns,
    normalize_schema,
)
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def user(content: str | None) -> dict[str, str | None]:
    return {"role": "user", "content": content}


def assistant(content: str | None) -> dict[str, str | None]:
    return {"role": "assistant", "content": content}


# ---------------------------------------------------------------------------------------------------------------------
# Schemas: each one trains on exactly the tokens trl.DPOTrainer trains on
# ---------------------------------------------------------------------------------------------------------------------


def capybara(num_examples: int = 4, turns: tuple[int, int] = (1, 2)) -> Dataset:
    """Short conversations, so that a full training step stays fast."""
    return make_preference_dataset(num_examples, prompt_words=(8, 24), response_words=(2, 8), turns=turns)


def schema_datasets() -> dict[str, tuple[Dataset, Dataset]]:
    """Each schema: (our input, the same examples in a schema trl.DPOTrainer reads)."""
    rows = capybara().to_list()
    multi_turn = capybara(turns=(2, 3)).to_list()
    standard = make_preference_dataset(4, conversational=False, prompt_words=(8, 24), response_words=(2, 8))
    conversational = Dataset.from_list(
        [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows]
    )
    single_turn = capybara(8, turns=(1, 1)).to_list()
    prompt_and_replies = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in single_turn]
    )
    shared_turns = Dataset.from_list(
        [{"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in multi_turn]
    )
    implicit_text = Dataset.from_list(
        [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in standard.to_list()]
    )
    return {
        "standard": (standard, standard),
        "conversational": (conversational, conversational),
        "implicit-prompt-strings": (implicit_text, implicit_text),
        "implicit-prompt-conversations": (capybara().remove_columns("prompt"),) * 2,
        "capybara": (capybara(), capybara().remove_columns("prompt")),
        "prompt-and-replies": (
            prompt_and_replies,
            prompt_and_replies.map(lambda r: {"prompt": [user(r["prompt"])]}),
        ),
        "multi-turn-shared-assistant-turns": (shared_turns, shared_turns),
    }


def prepared(trainer_cls: type[DPOTrainer], dataset: Dataset, tokenizer: Any = None, **config: Any) -> Dataset:
    config_cls = PrefixDPOConfig if trainer_cls is PrefixDPOTrainer else DPOConfig
    extra = {"prefix_sharing": True} if trainer_cls is PrefixDPOTrainer else {}
    args = config_cls(output_dir="/tmp/prefix-dpo-tests", report_to="none", bf16=False, **{**extra, **config})
    trainer = trainer_cls(
        model=tiny_model("llama"),
        ref_model=tiny_model("llama"),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer or load_tokenizer(),
    )
    return trainer.train_dataset.select_columns(COLUMNS)


@pytest.mark.filterwarnings("ignore:.*begin with the same turns after the prompt")
@pytest.mark.parametrize("schema", list(schema_datasets()))
def test_schema_trains_on_trl_tokens(schema: str) -> None:
    ours_input, trl_input = schema_datasets()[schema]
    ours = prepared(PrefixDPOTrainer, ours_input, max_length=None)
    assert ours.to_list() == prepared(DPOTrainer, trl_input, max_length=None).to_list()
    if schema == "implicit-prompt-strings":  # TRL's extract_prompt finds exactly the standard schema's prompt
        standard = schema_datasets()["standard"][0]
        assert ours.to_list() == prepared(PrefixDPOTrainer, standard, max_length=None).to_list()
    if schema == "multi-turn-shared-assistant-turns":  # the shared assistant turn is trained, as in TRL
        for example in ours:
            assert example["chosen_ids"][:3] == example["rejected_ids"][:3]


@pytest.mark.parametrize(
    "schema", ["standard", "conversational", "implicit-prompt-strings", "multi-turn-shared-assistant-turns"]
)
def test_schema_training_step_matches_trl(schema: str) -> None:
    dataset, _ = schema_datasets()[schema]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_trainer, ours = make_trainers(dataset)
    assert_same_step(train_step(ours), train_step(trl_trainer))


def test_shared_assistant_turns_are_reported() -> None:
    dataset = schema_datasets()["multi-turn-shared-assistant-turns"][0]
    with pytest.warns(UserWarning, match=r"4 train examples \(rows 0, 1, 2, 3\): chosen and rejected begin with"):
        normalize_schema(dataset)


def test_hoisting_shared_turns_keeps_the_sigmoid_loss_and_changes_the_metrics() -> None:
    """Opt-in: moving the shared assistant turns into the prompt shares them, and trains the same sigmoid loss and
    gradient as trl.DPOTrainer on the original rows; the log-prob metrics no longer count those turns."""
    original = schema_datasets()["multi-turn-shared-assistant-turns"][0]
    hoisted = hoist_shared_turns(original)
    assert all(len(h["prompt"]) > len(o["prompt"]) for h, o in zip(hoisted, original, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_trainer, _ = make_trainers(original)
        _, ours = make_trainers(hoisted)
    for ours_example, trl_example in zip(ours.train_dataset, trl_trainer.train_dataset, strict=True):
        for response in ("chosen_ids", "rejected_ids"):  # the same training sequences, split later
            assert (
                ours_example["prompt_ids"] + ours_example[response]
                == trl_example["prompt_ids"] + trl_example[response]
            )
        assert len(ours_example["prompt_ids"]) > len(trl_example["prompt_ids"])
    ours_step, trl_step = train_step(ours), train_step(trl_trainer)
    assert relative_error(ours_step.loss, trl_step.loss) <= 1e-5
    for name, grad in trl_step.grads.items():
        assert relative_error(ours_step.grads[name], grad) <= 1e-5, name
    assert ours_step.metrics["logps/chosen"] > trl_step.metrics["logps/chosen"] + 1  # fewer tokens scored


IMPLICIT_CONVERSATIONS = {
    "chosen": [user("Sky colour?"), assistant("Blue.")],
    "rejected": [user("Sky colour?"), assistant("Green.")],
}
UNKNOWN_SCHEMAS = {
    "sft-messages": ({"messages": [user("a"), assistant("b")]}, r"messages \(list of messages\).*language-modeling"),
    "unpaired-kto": ({"prompt": "a", "completion": "b", "label": True}, r"completion \(string\), label \(bool\)"),
    "stack-exchange-paired": (
        {"question": "q", "response_j": "a", "response_k": "b"},
        r"question \(string\), response_j \(string\), response_k \(string\)",
    ),
    "sharegpt-messages": (
        {"chosen": [{"from": "human", "value": "a"}], "rejected": [{"from": "human", "value": "b"}]},
        r"from/value messages \(ShareGPT\).*maybe_convert_to_chatml",
    ),
    "messages-prompt-string-responses": (
        {"prompt": [user("a")], "chosen": "b", "rejected": "c"},
        r"prompt \(list of messages\), chosen \(string\), rejected \(string\)",
    ),
    "chosen-only": ({"prompt": "a", "chosen": "b"}, r"Columns found: prompt \(string\), chosen \(string\)\."),
    "integer-responses": ({"prompt": "a", "chosen": 1, "rejected": 0}, r"chosen \(int64\), rejected \(int64\)"),
}


@pytest.mark.parametrize("schema", list(UNKNOWN_SCHEMAS))
def test_unknown_schema_is_one_error_listing_columns_and_accepted_schemas(schema: str) -> None:
    row, columns = UNKNOWN_SCHEMAS[schema]
    with pytest.raises(ValueError, match=r"(?s)none of the accepted preference schemas.*" + columns) as error:
        normalize_schema(Dataset.from_list([row]))
    assert "standard:" in str(error.value) and "Capybara:" in str(error.value)


def test_unknown_schema_raises_before_tokenization() -> None:
    dataset = Dataset.from_list([UNKNOWN_SCHEMAS["sft-messages"][0]])
    with pytest.raises(ValueError, match="none of the accepted preference schemas"):
        prepared(PrefixDPOTrainer, dataset)


PROMPT_UNDER_ANOTHER_NAME = {
    # orca_dpo_pairs: its responses share no start, so today's error would not name `question`
    "orca-system-question": (
        {"system": "You are brief.", "question": "Sky colour?", "chosen": "Blue.", "rejected": "Green."},
        "'system', 'question'",
        r"\{'prompt': row\['system'\] \+ '\\n\\n' \+ row\['question'\]\}",
    ),
    # responses that begin alike would silently train on "The sky is" as the prompt
    "instruction-responses-begin-alike": (
        {"instruction": "Name a colour.", "chosen": "The sky is blue.", "rejected": "The sky is green."},
        "'instruction'",
        r"\{'prompt': row\['instruction'\]\}",
    ),
    "system-beside-conversations": (
        {"system": "Be brief.", **IMPLICIT_CONVERSATIONS},
        "'system'",
        r"\{'prompt': \[\{'role': 'system', 'content': row\['system'\]\}\]\}",
    ),
}


@pytest.mark.parametrize("streamed", [False, True], ids=["map-style", "streamed"])
@pytest.mark.parametrize("case", list(PROMPT_UNDER_ANOTHER_NAME))
def test_a_prompt_under_another_name_is_an_error_showing_the_mapping(case: str, streamed: bool) -> None:
    row, names, mapping = PROMPT_UNDER_ANOTHER_NAME[case]
    dataset = Dataset.from_list([row, row])
    if streamed:
        dataset = dataset.to_iterable_dataset()
    message = rf"(?s)no 'prompt' column.*text column\(s\) {names}, which no preference schema reads.*{mapping}"
    with pytest.raises(ValueError, match=message):
        normalize_schema(dataset)


def test_once_mapped_to_prompt_the_columns_are_kept_and_train_on_trl_tokens() -> None:
    row, _, _ = PROMPT_UNDER_ANOTHER_NAME["orca-system-question"]
    mapped = Dataset.from_list([row] * 2).map(lambda r: {"prompt": r["system"] + "\n\n" + r["question"]})
    assert prepared(PrefixDPOTrainer, mapped).to_list() == prepared(DPOTrainer, mapped).to_list()


def test_other_text_columns_beside_an_implicit_prompt_are_kept() -> None:
    dataset = Dataset.from_list([{"source": "forum", **IMPLICIT_CONVERSATIONS}])
    assert normalize_schema(dataset).to_list() == dataset.to_list()


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows: an error naming the row and the problem
# ---------------------------------------------------------------------------------------------------------------------

TEXT = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
CONVERSATION = {"prompt": [user("Sky colour?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}
IMPLICIT = {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Green.")]}
BAD_ROWS = {
    "none-chosen": (TEXT, {"chosen": None}, r"row 1: 'chosen' is missing \(None\)"),
    "none-prompt": (TEXT, {"prompt": None}, r"row 1: 'prompt' is missing \(None\)"),
    "responses-repeat-prompt": (
        TEXT,
        {"chosen": "The sky is blue", "rejected": "The sky is red"},
        r"row 1: 'chosen' and 'rejected' both repeat the whole 'prompt'",
    ),
    "none-content": (CONVERSATION, {"chosen": [assistant(None)]}, r"row 1: chosen\[0\] \(assistant\) has no content"),
    "empty-conversation": (CONVERSATION, {"rejected": []}, r"row 1: 'rejected' is an empty list of messages"),
    "none-conversation": (CONVERSATION, {"rejected": None}, r"row 1: 'rejected' is missing \(None\)"),
    "last-turn-not-assistant": (
        CONVERSATION,
        {"chosen": [assistant("Blue."), user("Sure?")]},
        r"row 1: 'chosen' ends with a user message; a response must end with an assistant message",
    ),
    "response-starts-with-user": (
        CONVERSATION,
        {"rejected": [user("Green?"), assistant("Green.")]},
        r"row 1: 'rejected' starts with a user message; a response must start with an assistant message",
    ),
    "unknown-role": (
        CONVERSATION,
        {"prompt": [{"role": "human", "content": "hi"}]},
        r"row 1: prompt\[0\] has role 'human', expected one of system, developer, user, assistant, tool",
    ),
    "implicit-no-common-turn": (
        IMPLICIT,
        {"rejected": [user("Sea?"), assistant("Blue.")]},
        r"row 1: 'chosen' and 'rejected' share no leading turn, so there is no prompt",
    ),
    "implicit-diverges-at-user-turn": (
        IMPLICIT,
        {
            "chosen": [user("Sky?"), assistant("Blue."), user("Sure?"), assistant("Yes.")],
            "rejected": [user("Sky?"), assistant("Blue."), user("Really?"), assistant("No.")],
        },
        r"row 1: 'chosen' after the turns shared with the other response \(the implicit prompt\) starts with a user",
    ),
    "implicit-empty-string": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": ""},
        r"row 1: 'chosen' is empty: with no 'prompt' column",
    ),
    "implicit-strings-no-common-start": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Yes ", "rejected": "No"},
        r"row 1: 'chosen' and 'rejected' have no common start",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_an_error_naming_it(case: str) -> None:
    good, change, message = BAD_ROWS[case]
    dataset = Dataset.from_list([good, {**good, **change}, good])
    with pytest.raises(
        ValueError, match=r"1 of the 3 rows of the train dataset .* cannot be trained on[^$]*" + message
    ):
        normalize_schema(dataset)


def test_bad_rows_reported_together_through_the_trainer() -> None:
    rows = [TEXT, {**TEXT, "chosen": None}, TEXT, {**TEXT, "rejected": None}]
    with pytest.raises(ValueError, match=r"(?s)2 of the 4 rows.*row 1: 'chosen' is missing.*row 3: 'rejected'"):
        prepared(PrefixDPOTrainer, Dataset.from_list(rows))


def test_streamed_bad_row_is_an_error_naming_it() -> None:
    dataset = Dataset.from_list([TEXT, TEXT, {**TEXT, "chosen": None}]).to_iterable_dataset()
    rows = iter(normalize_schema(dataset))
    next(rows), next(rows)
    with pytest.raises(ValueError, match=r"Row 2 of the streamed train dataset \(standard schema\): 'chosen' is"):
        next(rows)


def test_empty_dataset_is_an_error() -> None:
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="The train dataset is empty"):
        normalize_schema(empty)
    with pytest.raises(ValueError, match="The eval dataset is empty"):
        check_datasets_not_empty(None, Dataset.from_list([TEXT]), empty)
    with pytest.raises(ValueError, match="The train dataset is empty"):  # not TRL's bare StopIteration
        prepared(PrefixDPOTrainer, empty)


# ---------------------------------------------------------------------------------------------------------------------
# After tokenization: errors, documented drops with counts, and TRL's tokens kept
# ---------------------------------------------------------------------------------------------------------------------


def test_empty_prompt_is_an_error_naming_the_row() -> None:
    tokenizer = load_tokenizer()
    tokenizer.add_bos_token = False  # a tokenizer without BOS: an empty prompt is 0 tokens
    assert tokenizer("").input_ids == []
    rows = [TEXT, {**TEXT, "prompt": ""}]
    with pytest.raises(ValueError, match=r"row 1: the prompt is 0 tokens\. The first response token is predicted"):
        prepared(PrefixDPOTrainer, Dataset.from_list(rows), tokenizer=tokenizer)


def test_empty_prompt_with_a_bos_tokenizer_is_one_token() -> None:
    ours = prepared(PrefixDPOTrainer, Dataset.from_list([TEXT, {**TEXT, "prompt": ""}]))
    assert ours[1]["prompt_ids"] == [load_tokenizer().bos_token_id]


def test_empty_string_response_is_an_eos_only_response_as_in_trl() -> None:
    dataset = Dataset.from_list([TEXT, {**TEXT, "chosen": ""}])
    ours = prepared(PrefixDPOTrainer, dataset)
    assert ours[1]["chosen_ids"] == [load_tokenizer().eos_token_id]
    assert ours.to_list() == prepared(DPOTrainer, dataset, max_length=None).to_list()


def test_zero_token_rows_in_a_tokenized_dataset_are_errors() -> None:
    tokenized = Dataset.from_list(
        [
            {"prompt_ids": [1, 5], "chosen_ids": [6], "rejected_ids": [7]},
            {"prompt_ids": [], "chosen_ids": [6], "rejected_ids": [7]},
            {"prompt_ids": [1], "chosen_ids": [6], "rejected_ids": []},
        ]
    )
    args = PrefixDPOConfig(output_dir="/tmp/prefix-dpo-tests", report_to="none", bf16=False)
    with pytest.raises(
        ValueError, match=r"(?s)row 1: the prompt is 0 tokens.*row 2: the rejected response is 0 tokens"
    ):
        finish_tokenized(tokenized, None, args)


def test_identical_pairs_are_dropped_and_counted() -> None:
    conversation_twin = {**CONVERSATION, "rejected": CONVERSATION["chosen"]}
    rows = [CONVERSATION, conversation_twin, CONVERSATION, conversation_twin]
    with pytest.warns(
        UserWarning, match=r"2 train examples dropped: chosen and rejected are the same tokens .*rows 1, 3"
    ):
        ours = prepared(PrefixDPOTrainer, Dataset.from_list(rows))
    assert len(ours) == 2


def test_pairs_identical_after_truncation_are_dropped_and_counted() -> None:
    rows = [TEXT, {**TEXT, "chosen": " blue sky and sea", "rejected": " blue sky and land"}]
    with pytest.warns(
        UserWarning, match=r"1 train examples dropped: chosen and rejected are the same tokens after trunc"
    ):
        ours = prepared(PrefixDPOTrainer, Dataset.from_list(rows), max_length=10)
    assert len(ours) == 1


def test_prompt_filling_max_length_is_dropped_and_counted() -> None:
    rows = [TEXT, {**TEXT, "prompt": "word " * 40}, TEXT]
    with pytest.warns(
        UserWarning, match=r"1 train examples dropped: their prompt alone fills max_length=20 tokens \(row 1\)"
    ):
        ours = prepared(PrefixDPOTrainer, Dataset.from_list(rows), max_length=20)
    assert len(ours) == 2


def test_nothing_left_after_drops_is_an_error() -> None:
    rows = [{**TEXT, "prompt": "word " * 40}] * 2
    with pytest.raises(ValueError, match="All 2 examples of the train dataset were dropped"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared(PrefixDPOTrainer, Dataset.from_list(rows), max_length=20)


def test_prompt_not_a_token_prefix_keeps_trl_tokens_and_is_counted() -> None:
    """ "The sky is " + "blue": the trailing space merges into the response's first token, so the tokenized prompt is
    not a prefix. As TRL does, the response starts where the tokenizations diverge; the rows are reported."""
    rows = [TEXT, {**TEXT, "prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}]
    dataset = Dataset.from_list(rows)
    with pytest.warns(UserWarning, match=r"1 of the 2 train examples \(row 1\): the tokenized prompt is not a prefix"):
        ours = prepared(PrefixDPOTrainer, dataset)
    assert ours.to_list() == prepared(DPOTrainer, dataset, max_length=None).to_list()


# ---------------------------------------------------------------------------------------------------------------------
# Bad flags and combinations: errors at start-up, before any model is loaded
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn3", "paged|sdpa", "paged|eager"]
)
@pytest.mark.parametrize("layout", [{"prefix_sharing": True}, {"enable_packing": True}])
def test_attention_backend_that_cannot_take_the_mask(backend: str, layout: dict[str, Any]) -> None:
    args = PrefixDPOConfig(
        output_dir="/tmp/prefix-dpo-tests",
        report_to="none",
        bf16=False,
        model_init_kwargs={"attn_implementation": backend},
        **layout,
    )
    # The model path does not exist: the error comes before anything is loaded.
    with pytest.raises(ValueError, match=rf"attn_implementation='{backend}' cannot take the prefix-sharing attention"):
        PrefixDPOTrainer(model="/nonexistent/model", args=args, train_dataset=Dataset.from_list([TEXT]))


BAD_FLAGS = {
    "max_prompt_length>=max_length": (
        {"max_length": 64, "max_prompt_length": 64},
        r"--max_prompt_length \(64\) must be smaller than --max_length \(64\)",
    ),
    "max_prompt_length-without-max_length": (
        {"max_length": None, "max_prompt_length": 8},
        r"--max_prompt_length \(8\) must be smaller than --max_length \(None\)",
    ),
    "max_prompt_length=0": ({"max_length": 64, "max_prompt_length": 0}, r"--max_prompt_length must be at least 1"),
    "max_prompt_length<0": ({"max_length": 64, "max_prompt_length": -3}, r"--max_prompt_length must be at least 1"),
    "max_length=1": ({"max_length": 1}, r"--max_length must be at least 2 \(one prompt and one response token\)"),
    "train-batch-size=0": ({"per_device_train_batch_size": 0}, r"--per_device_train_batch_size must be at least 1"),
    "eval-batch-size=0": ({"per_device_eval_batch_size": 0}, r"--per_device_eval_batch_size must be at least 1"),
    "packed-rows-per-batch=0": (
        {"enable_packing": True, "per_device_train_batch_size": 0},
        r"--per_device_train_batch_size must be at least 1",
    ),
    "gradient-accumulation=0": ({"gradient_accumulation_steps": 0}, r"--gradient_accumulation_steps must be at least"),
    "precompute-batch-size=0": (
        {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 0},
        r"--precompute_ref_batch_size must be at least 1",
    ),
    "packing_length=0": ({"enable_packing": True, "packing_length": "0"}, r"--packing_length must be a positive"),
    "packing_length=abc": ({"enable_packing": True, "packing_length": "abc"}, r"--packing_length must be a positive"),
    "packing_length-without-packing": ({"packing_length": "512"}, r"--packing_length is only used with --enable_pa"),
}


def test_keep_end_fails_when_the_trainer_is_built() -> None:
    """keep_end cuts the prompt differently before each response; the trainer refuses it, naming the flag, before
    it loads anything (the model path does not exist). The config takes it, with TRL's deprecation warning, so that
    TRL's order (its config warns, its trainer refuses vision data) holds."""
    with pytest.warns(FutureWarning, match="keep_end"):
        args = PrefixDPOConfig(
            output_dir="/tmp/prefix-dpo-tests",
            report_to="none",
            bf16=False,
            prefix_sharing=True,
            max_length=64,
            truncation_mode="keep_end",
        )
    with pytest.raises(ValueError, match="--truncation_mode keep_end cuts the prompt differently before each"):
        PrefixDPOTrainer(model="/nonexistent/model", args=args, train_dataset=Dataset.from_list([TEXT]))


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_fail_when_the_config_is_built(case: str) -> None:
    flags, message = BAD_FLAGS[case]
    with pytest.raises(ValueError, match=message):
        PrefixDPOConfig(output_dir="/tmp/prefix-dpo-tests", report_to="none", bf16=False, prefix_sharing=True, **flags)
