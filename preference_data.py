"""Preference-dataset preparation that must be identical with and without prefix sharing.

TRL tokenizes each example into ``prompt_ids``/``chosen_ids``/``rejected_ids``. Around that, this module

* checks the schema and every row *before* tokenization (:func:`normalize_schema`): an unknown schema is one error
  that lists the columns found and the schemas accepted; a bad row is a ``ValueError`` naming the row and the problem;
  the Capybara schema is normalized;
* fits the tokenized examples to ``max_length`` *after* tokenization, per example, so that the prompt is cut once and
  stays a prefix shared by both responses, and drops, by a documented rule with the counts reported, the examples
  that cannot train (:func:`finish_tokenized`);
* checks the length and batch-size flags (:func:`check_config`).

Accepted schemas (extra columns, e.g. ratings, ``tools`` or ``chat_template_kwargs``, are kept and ignored here):

==================  ==============================================================================================
standard            ``prompt``, ``chosen``, ``rejected``: strings (the responses without the prompt)
conversational      ``prompt``, ``chosen``, ``rejected``: lists of messages
implicit prompt     ``chosen``, ``rejected`` only, both strings or both lists of messages; the prompt is what they
                    start with in common (TRL's ``extract_prompt``)
Capybara            ``prompt``: string (the first user turn), ``chosen``/``rejected``: whole conversations (from the
                    first user or system turn); the ``prompt`` column is dropped, the prompt is every turn they share
prompt + replies    ``prompt``: string, ``chosen``/``rejected``: lists of assistant messages; the prompt becomes one
                    user message
==================  ==============================================================================================

A message is a dict with a ``role`` (one of :data:`ROLES`) and a string ``content``; an assistant message that
calls tools (``tool_calls``) may have no content. Tool-call conversations (assistant tool calls, ``tool`` turns, and
TRL's ``tools`` column, which the chat template renders) are read as TRL reads them, whether the messages are stored
as structs or with the ``datasets`` ``Json`` feature type (messages of mixed keys). After the prompt is settled, each
response must start and end with an assistant message.

Without a ``prompt`` column, ``chosen``/``rejected`` are an implicit-prompt pair. A text column that holds a prompt
under another name (:data:`PROMPT_LIKE_COLUMNS`: ``question``, ``instruction``, ``system``, ...) would then be left
out silently, so it is an error that names it and shows how to map it to ``prompt`` (orca_dpo_pairs' ``system`` +
``question``, for example).

Rules for rows (each tested in ``tests/test_bad_input.py``):

* an error naming the row: ``None``/missing text or content, non-string content, an empty list of messages, an
  unknown role, a response that does not start or end with an assistant message, an implicit prompt that is empty
  (chosen and rejected have nothing in common), string responses that repeat the whole prompt, a prompt or response
  of 0 tokens after tokenization (prefix sharing predicts the first response token from the last prompt token);
* dropped, with the count and rows reported at start-up: an example whose prompt alone fills ``max_length`` (without
  ``max_prompt_length``, as TRL drops it), and an example whose chosen and rejected token ids are identical after
  truncation (no preference: its sigmoid-loss gradient is zero, it only dilutes the batch mean);
* kept as TRL keeps them: an empty string response (TRL appends EOS: a one-token response); a prompt whose
  tokenization is not a prefix of prompt + response (TRL starts the response where they diverge; the count is
  reported); chosen and rejected conversations that begin with the same assistant turns after an explicit prompt
  (TRL trains those turns as part of both responses, and the prefix tree computes them once; see
  :func:`hoist_shared_turns` to make them context instead).
"""

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from datasets import Dataset, IterableDataset
from trl.data_utils import _tokenize, extract_prompt

ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT = "string"
MESSAGES = "list of messages"
STANDARD, CONVERSATIONAL, IMPLICIT_TEXT, IMPLICIT_MESSAGES, CAPYBARA, PROMPT_AND_REPLIES = (
    "standard",
    "conversational",
    "implicit prompt (strings)",
    "implicit prompt (conversations)",
    "Capybara",
    "prompt + replies",
)
ACCEPTED_SCHEMAS = (
    "  standard:         prompt, chosen, rejected: strings (the responses without the prompt)\n"
    "  conversational:   prompt, chosen, rejected: lists of messages\n"
    "  implicit prompt:  chosen, rejected only, both strings or both lists of messages (the prompt is their common "
    "start)\n"
    "  Capybara:         prompt: string; chosen, rejected: whole conversations (from the first user turn)\n"
    "  prompt + replies: prompt: string; chosen, rejected: lists of assistant messages\n"
    "A message is a dict {'role': one of " + ", ".join(ROLES) + ", 'content': string}; an assistant message with "
    "'tool_calls' may have no content."
)
# Column names that hold a prompt in public preference datasets that have no `prompt` column.
PROMPT_LIKE_COLUMNS = (
    "system",
    "system_prompt",
    "instruction",
    "input",
    "question",
    "query",
    "context",
    "problem",
    "history",
)
# At most this many row numbers are named in an error or a report.
ROWS_NAMED = 5


def is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


# ---------------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------------


def _feature_kind(feature: Any) -> str | None:
    """``TEXT``, ``MESSAGES`` or a short description of a ``datasets`` feature; ``None`` for a feature holding
    ``Json`` values (messages whose keys differ, such as tool calls), whose kind only a value can tell."""
    if type(feature).__name__ == "Json":
        return None
    dtype = getattr(feature, "dtype", None)
    if type(feature).__name__ == "Value":
        return TEXT if dtype in ("string", "large_string") else ("null (no values)" if dtype == "null" else dtype)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, dict):
        if "role" in inner:
            return MESSAGES
        if "from" in inner and "value" in inner:
            return "list of from/value messages (ShareGPT)"
        return f"list of dicts with keys {sorted(inner)}"
    if inner is not None:
        inner_kind = _feature_kind(inner)
        return None if inner_kind is None else f"list of {inner_kind}"
    return type(feature).__name__


def _value_kind(value: Any) -> str:
    if isinstance(value, str):
        return TEXT
    if is_message_list(value):
        return MESSAGES
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return "list of from/value messages (ShareGPT)"
    return "None" if value is None else type(value).__name__


def _first_row(dataset: Dataset | IterableDataset) -> dict[str, Any]:
    return dataset[0] if isinstance(dataset, Dataset) else next(iter(dataset))


def _column_kinds(dataset: Dataset | IterableDataset) -> dict[str, str]:
    features = dataset.features
    kinds = {} if features is None else {name: _feature_kind(feature) for name, feature in features.items()}
    if features is None or None in kinds.values():
        row = _first_row(dataset)
        kinds = {name: kinds.get(name) or _value_kind(value) for name, value in row.items()}
    return kinds


def detect_schema(dataset: Dataset | IterableDataset, dataset_name: str = "train") -> str:
    """Which accepted schema ``dataset`` is in (see the module docstring); a ``ValueError`` that lists the columns
    found and the schemas accepted otherwise."""
    kinds = _column_kinds(dataset)
    prompt, chosen, rejected = (kinds.get(name) for name in ("prompt", "chosen", "rejected"))
    if prompt is None and chosen == rejected and chosen in (TEXT, MESSAGES):
        _check_no_prompt_under_another_name(kinds, dataset_name)
    schema = None
    if chosen == rejected and chosen in (TEXT, MESSAGES):
        if prompt is None:
            schema = IMPLICIT_TEXT if chosen == TEXT else IMPLICIT_MESSAGES
        elif prompt == chosen:
            schema = STANDARD if chosen == TEXT else CONVERSATIONAL
        elif prompt == TEXT:
            first_response = _first_row(dataset)["chosen"]
            starts_with_reply = is_message_list(first_response) and first_response[0].get("role") == "assistant"
            schema = PROMPT_AND_REPLIES if starts_with_reply else CAPYBARA
    if schema is not None:
        return schema
    found = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    hints = []
    if "messages" in kinds:
        hints.append("A 'messages' column is a language-modeling (SFT) dataset, not preference pairs.")
    if "completion" in kinds and "label" in kinds:
        hints.append(
            "'completion' + 'label' is the unpaired (KTO) schema: DPO needs a chosen and a rejected response."
        )
    if any("ShareGPT" in kind for kind in kinds.values()):
        hints.append("Convert from/value messages to role/content with trl.data_utils.maybe_convert_to_chatml.")
    raise ValueError(
        f"The {dataset_name} dataset is in none of the accepted preference schemas. Columns found: {found}.\n"
        f"Accepted schemas:\n{ACCEPTED_SCHEMAS}" + "".join(f"\n{hint}" for hint in hints)
    )


def _check_no_prompt_under_another_name(kinds: dict[str, str], dataset_name: str) -> None:
    columns = [name for name in PROMPT_LIKE_COLUMNS if kinds.get(name) in (TEXT, MESSAGES)]
    if not columns:
        return
    named = ", ".join(f"'{name}'" for name in columns)
    if kinds["chosen"] == TEXT:
        prompt = " + '\\n\\n' + ".join(f"row['{name}']" for name in columns)
        responses = "strings holding the responses only (the standard schema)"
    else:
        prompt = ", ".join(
            f"{{'role': '{'system' if name.startswith('system') else 'user'}', 'content': row['{name}']}}"
            for name in columns
        )
        prompt = f"[{prompt}]"
        responses = "the assistant messages after the prompt (the conversational schema)"
    raise ValueError(
        f"The {dataset_name} dataset has no 'prompt' column, so 'chosen' and 'rejected' would be read as an implicit "
        f"prompt (the start they share), but it also has the text column(s) {named}, which no preference schema "
        "reads: the prompt they hold would be left out of training. Map them to a 'prompt' column:\n"
        f"  dataset = dataset.map(lambda row: {{'prompt': {prompt}}})\n"
        f"with 'chosen' and 'rejected' {responses}. If they hold no part of the prompt, remove them: "
        f"dataset = dataset.remove_columns([{named}])."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------


def _text_problem(value: Any, column: str) -> str | None:
    if value is None:
        return f"'{column}' is missing (None)"
    if not isinstance(value, str):
        return f"'{column}' is a {type(value).__name__}, expected a string"
    return None


def _messages_problem(value: Any, column: str) -> str | None:
    if value is None:
        return f"'{column}' is missing (None)"
    if not isinstance(value, list):
        return f"'{column}' is a {type(value).__name__}, expected a list of messages"
    if not value:
        return f"'{column}' is an empty list of messages"
    for number, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{column}[{number}] is a {type(message).__name__}, expected a message dict"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{column}[{number}] has role {role!r}, expected one of {', '.join(ROLES)}"
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue  # a tool call: the chat template renders `tool_calls`
            return f"{column}[{number}] ({role}) has no content (None)"
        if not isinstance(content, str):
            return f"{column}[{number}] ({role}) has content of type {type(content).__name__}, expected a string"
    return None


def _response_roles_problem(messages: list[dict[str, Any]], column: str, implicit: bool = False) -> str | None:
    where = " after the turns shared with the other response (the implicit prompt)" if implicit else ""
    if messages[0]["role"] != "assistant":
        return (
            f"'{column}'{where} starts with a {messages[0]['role']} message; a response must start with an assistant "
            "message, which follows the prompt's generation prompt"
        )
    if messages[-1]["role"] != "assistant":
        return f"'{column}' ends with a {messages[-1]['role']} message; a response must end with an assistant message"
    return None


def _common_start(first: Sequence[Any], second: Sequence[Any]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def row_problem(example: dict[str, Any], schema: str) -> str | None:
    """What is wrong with one raw row of a dataset in ``schema``, or ``None``. Identical pairs are not a problem here:
    they are dropped after tokenization, where "identical" means the same tokens."""
    implicit = schema in (IMPLICIT_TEXT, IMPLICIT_MESSAGES, CAPYBARA)
    response_check = _text_problem if schema in (STANDARD, IMPLICIT_TEXT) else _messages_problem
    checks = {"chosen": response_check, "rejected": response_check}
    if not implicit:
        checks = {"prompt": _text_problem if schema in (STANDARD, PROMPT_AND_REPLIES) else _messages_problem, **checks}
    for column, check in checks.items():
        problem = check(example[column], column)
        if problem:
            return problem
    chosen, rejected = example["chosen"], example["rejected"]
    if schema == STANDARD:
        prompt = example["prompt"]
        if prompt.strip() and chosen.startswith(prompt) and rejected.startswith(prompt):
            return (
                "'chosen' and 'rejected' both repeat the whole 'prompt': in the standard schema they are the "
                "responses only. Strip the prompt from them, or drop the 'prompt' column (implicit prompt schema)"
            )
        return None
    if not implicit:
        for column in ("chosen", "rejected"):
            problem = _response_roles_problem(example[column], column)
            if problem:
                return problem
        return None
    if schema == IMPLICIT_TEXT:
        for column in ("chosen", "rejected"):
            if not example[column]:
                return f"'{column}' is empty: with no 'prompt' column the prompt is the text both responses start with"
    if chosen == rejected:
        return None  # dropped after tokenization, as identical tokens
    extracted = extract_prompt({"chosen": chosen, "rejected": rejected})
    if _common_start(chosen, rejected) == 0 or not extracted["prompt"]:
        if schema == IMPLICIT_TEXT:
            return "'chosen' and 'rejected' have no common start, so there is no prompt (and no 'prompt' column)"
        return (
            "'chosen' and 'rejected' share no leading turn, so there is no prompt: without a conversational 'prompt' "
            "column, the prompt is the turns both conversations start with"
        )
    if schema == IMPLICIT_TEXT:
        return None
    for column in ("chosen", "rejected"):
        problem = _response_roles_problem(extracted[column], column, implicit=True)
        if problem:
            return problem
    return None


def _rows_text(rows: Sequence[int]) -> str:
    named = ", ".join(str(row) for row in rows[:ROWS_NAMED])
    return f"row{'s' if len(rows) > 1 else ''} {named}{', ...' if len(rows) > ROWS_NAMED else ''}"


def _iter_rows(dataset: Dataset, columns: list[str]) -> Iterable[dict[str, Any]]:
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[column] for column in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


def _shares_leading_turn(example: dict[str, Any]) -> bool:
    chosen, rejected = example["chosen"], example["rejected"]
    return len(chosen) > 1 and len(rejected) > 1 and chosen[0] == rejected[0]


def check_rows(dataset: Dataset, schema: str, dataset_name: str = "train") -> None:
    """Raises one ``ValueError`` naming the bad rows of a map-style ``dataset`` (the first few, and how many) and what
    is wrong with each; warns when conversations share leading response turns (kept, as TRL keeps them)."""
    columns = [name for name in ("prompt", "chosen", "rejected") if name in dataset.column_names]
    bad: list[tuple[int, str]] = []
    shared_turns: list[int] = []
    for index, example in enumerate(_iter_rows(dataset, columns)):
        problem = row_problem(example, schema)
        if problem:
            bad.append((index, problem))
        elif schema in (CONVERSATIONAL, PROMPT_AND_REPLIES) and _shares_leading_turn(example):
            shared_turns.append(index)
    if bad:
        listed = "\n".join(f"  row {index}: {problem}" for index, problem in bad[:ROWS_NAMED])
        more = f"\n  ... and {len(bad) - ROWS_NAMED} more" if len(bad) > ROWS_NAMED else ""
        raise ValueError(
            f"{len(bad)} of the {len(dataset)} rows of the {dataset_name} dataset ({schema} schema) cannot be "
            f"trained on; fix or remove them:\n{listed}{more}"
        )
    if shared_turns:
        warnings.warn(
            f"{len(shared_turns)} {dataset_name} examples ({_rows_text(shared_turns)}): chosen and rejected begin "
            "with the same turns after the prompt. As in trl.DPOTrainer, those turns are trained as part of both "
            "responses (prefix sharing computes them once: they are a start both responses share). "
            "preference_data.hoist_shared_turns moves them into the prompt instead, if they are meant as context "
            "(which changes the DPO metrics and losses other than sigmoid).",
            stacklevel=3,
        )


def _check_streamed_row(example: dict[str, Any], index: int, schema: str, dataset_name: str) -> dict[str, Any]:
    problem = row_problem(example, schema)
    if problem:
        raise ValueError(f"Row {index} of the streamed {dataset_name} dataset ({schema} schema): {problem}.")
    return {}


def normalize_schema(
    dataset: Dataset | IterableDataset, dataset_name: str = "train", args: Any = None
) -> Dataset | IterableDataset:
    """Checks the schema and every row (before tokenization), then puts the dataset in a schema TRL reads.

    Capybara's ``prompt`` is only the first user turn, while ``chosen``/``rejected`` hold the whole conversation,
    prompt turns included: the ``prompt`` column is dropped, and TRL finds the shared prefix itself (every turn the
    two conversations have in common). A string ``prompt`` beside assistant-only responses becomes a user message.

    Rows of a map-style dataset are all checked here (one ``ValueError`` names the bad ones); rows of a streamed
    dataset are checked as they are read. ``args`` (the trainer's config) gives ``dataset_num_proc``.
    """
    streamed = not isinstance(dataset, Dataset)
    if not streamed and len(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset is empty.")
    schema = detect_schema(dataset, dataset_name)
    if streamed:
        dataset = dataset.map(
            _check_streamed_row, with_indices=True, fn_kwargs={"schema": schema, "dataset_name": dataset_name}
        )
    else:
        check_rows(dataset, schema, dataset_name)
    if schema == CAPYBARA:
        dataset = dataset.remove_columns("prompt")
    elif schema == PROMPT_AND_REPLIES:
        map_kwargs = {} if streamed else {"num_proc": getattr(args, "dataset_num_proc", None)}
        dataset = dataset.map(
            lambda example: {"prompt": [{"role": "user", "content": example["prompt"]}]}, **map_kwargs
        )
    return dataset


def hoist_shared_turns(dataset: Dataset | IterableDataset, **map_kwargs: Any) -> Dataset | IterableDataset:
    """Opt-in, for the conversational and prompt + replies schemas: moves the turns that ``chosen`` and ``rejected``
    both begin with into the prompt, up to the last shared turn after which both responses continue with an
    assistant message.

    (The prefix tree computes those turns once either way.) The training sequences (``prompt_ids + chosen_ids`` and
    ``prompt_ids + rejected_ids``) are unchanged, but the moved turns become context instead of response, exactly as
    TRL treats the same conversations in the implicit-prompt and Capybara schemas. Differences from training the
    original rows with trl.DPOTrainer: the sigmoid loss and its gradient are the same (the moved turns' log-probs
    are identical in both responses and cancel); the ``logps/*``, ``rewards/*`` metrics, ``rpo``/``sft`` terms and
    losses that use one response alone or normalize by length change. ``tests/test_bad_input.py`` tests both.
    """

    def hoist(example: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = example["chosen"], example["rejected"]
        moved = 0
        for count in range(1, min(len(chosen), len(rejected))):
            if chosen[count - 1] != rejected[count - 1]:
                break
            if chosen[count]["role"] == "assistant" and rejected[count]["role"] == "assistant":
                moved = count
        prompt = example["prompt"]
        if isinstance(prompt, str):  # the prompt + replies schema
            prompt = [{"role": "user", "content": prompt}]
        return {
            "prompt": [*prompt, *chosen[:moved]],
            "chosen": chosen[moved:],
            "rejected": rejected[moved:],
        }

    return dataset.map(hoist, **map_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenized examples: truncation and drops
# ---------------------------------------------------------------------------------------------------------------------


def truncate_example(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_length: int | None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[int], list[int]] | None:
    """Fits ``prompt + the longer response`` into ``max_length``, or returns ``None`` when nothing of it can train.

    When it does not fit, the prompt keeps its last ``max_prompt_length`` tokens (if set), then both responses keep
    their first ``max_length - len(prompt)`` tokens. Without ``max_prompt_length`` a prompt that alone fills
    ``max_length`` leaves no response token, so the example is dropped, as TRL drops it.

    >>> truncate_example([1, 2, 3, 4], [5, 6, 7], [8], max_length=5, max_prompt_length=3)
    ([2, 3, 4], [5, 6], [8])
    """
    prompt, chosen, rejected = list(prompt_ids), list(chosen_ids), list(rejected_ids)
    if max_length is None or len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
    room = max_length - len(prompt)
    if room <= 0:
        return None
    return prompt, chosen[:room], rejected[:room]


STATUS = "_prefix_dpo_status"
KEEP, MOVED, PROMPT_FILLS, IDENTICAL = "", "moved", "prompt fills max_length", "identical"
EMPTY = "empty"  # prefix of the error statuses "empty prompt/chosen/rejected"


def _full_prompt_length(example: dict[str, Any], processing_class: Any) -> int:
    """Tokens of the prompt alone, tokenized as TRL tokenizes it (with the generation prompt if conversational)."""
    prompt = example["prompt"]
    if not isinstance(prompt, list):
        return len(_tokenize(processing_class, prompt)["input_ids"])
    tools = example.get("tools")
    if isinstance(tools, str):
        import json

        tools = json.loads(tools)
    kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    return len(_tokenize(processing_class, prompt, add_generation_prompt=True, **kwargs)["input_ids"])


def fit_example(
    example: dict[str, Any], max_length: int | None, max_prompt_length: int | None, processing_class: Any = None
) -> dict[str, Any]:
    """Truncates one tokenized example and gives it a status: kept (``""`` or ``"moved"``), dropped
    (``"prompt fills max_length"``, ``"identical"``) or an error (``"empty ..."``)."""
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not example[column]:
            return {STATUS: f"{EMPTY} {column.removesuffix('_ids')}"}
    fitted = truncate_example(
        example["prompt_ids"], example["chosen_ids"], example["rejected_ids"], max_length, max_prompt_length
    )
    if fitted is None:
        return {STATUS: PROMPT_FILLS}
    prompt, chosen, rejected = fitted
    status = KEEP
    if chosen == rejected:
        status = IDENTICAL
    elif processing_class is not None and "prompt" in example:
        if _full_prompt_length(example, processing_class) > len(example["prompt_ids"]):
            status = MOVED
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, STATUS: status}


def _fit_streamed(
    example: dict[str, Any], index: int, max_length: int | None, max_prompt_length: int | None, dataset_name: str
) -> dict[str, Any]:
    fitted = fit_example(example, max_length, max_prompt_length)
    if fitted[STATUS].startswith(EMPTY):
        raise ValueError(f"Row {index} of the streamed {dataset_name} dataset: {_empty_message(fitted[STATUS])}")
    return fitted


def _empty_message(status: str) -> str:
    part = status.removeprefix(f"{EMPTY} ")
    if part == "prompt":
        return (
            "the prompt is 0 tokens. The first response token is predicted from the last prompt token, so every "
            "example needs at least one (standard DPO would silently never train that token). Give the row a "
            "prompt, or use a tokenizer that adds a BOS token."
        )
    return f"the {part} response is 0 tokens after tokenization (the chat template rendered nothing for it)."


def finish_tokenized(
    dataset: Dataset | IterableDataset, processing_class: Any, args: Any, dataset_name: str = "train"
) -> Dataset | IterableDataset:
    """Fits every tokenized example to ``args.max_length`` (:func:`truncate_example`), then applies the rules of the
    module docstring: errors name their rows; drops and kept-as-TRL cases are reported with counts and rows.

    ``args`` is the trainer's config (``max_length``, ``max_prompt_length``, ``dataset_num_proc``). A streamed dataset
    is checked and truncated as it is read: its drops cannot be counted up front, which a warning says.
    """
    max_length, max_prompt_length = args.max_length, getattr(args, "max_prompt_length", None)
    if not isinstance(dataset, Dataset):
        warnings.warn(
            f"The {dataset_name} dataset is streamed: examples whose prompt alone fills max_length or whose chosen "
            "and rejected are the same tokens are skipped as they are read, and cannot be counted up front.",
            stacklevel=2,
        )
        fn_kwargs = {"max_length": max_length, "max_prompt_length": max_prompt_length, "dataset_name": dataset_name}
        dataset = dataset.map(_fit_streamed, with_indices=True, fn_kwargs=fn_kwargs)
        return dataset.filter(lambda example: example[STATUS] in (KEEP, MOVED)).remove_columns(STATUS)

    fn_kwargs = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "processing_class": processing_class,
    }
    dataset = dataset.map(fit_example, fn_kwargs=fn_kwargs, num_proc=args.dataset_num_proc)
    statuses = dataset[STATUS]
    rows: dict[str, list[int]] = {}
    for index, status in enumerate(statuses):
        if status:
            rows.setdefault(status, []).append(index)
    errors = sorted(status for status in rows if status.startswith(EMPTY))
    if errors:
        listed = "\n".join(f"  {_rows_text(rows[status])}: {_empty_message(status)}" for status in errors)
        raise ValueError(f"The {dataset_name} dataset has examples that cannot be trained on:\n{listed}")
    if MOVED in rows:
        warnings.warn(
            f"{len(rows[MOVED])} of the {len(statuses)} {dataset_name} examples ({_rows_text(rows[MOVED])}): the "
            "tokenized prompt is not a prefix of the tokenized prompt + response. As trl.DPOTrainer does, the "
            "response starts where the two diverge, so the end of the prompt is left out of the training sequence "
            "(see TRL's warning above for which tokens). Kept: prefix sharing trains on TRL's tokens.",
            stacklevel=2,
        )
    if PROMPT_FILLS in rows:
        warnings.warn(
            f"{len(rows[PROMPT_FILLS])} {dataset_name} examples dropped: their prompt alone fills "
            f"max_length={max_length} tokens ({_rows_text(rows[PROMPT_FILLS])}). Set --max_prompt_length to truncate "
            "such prompts instead.",
            stacklevel=2,
        )
    if IDENTICAL in rows:
        warnings.warn(
            f"{len(rows[IDENTICAL])} {dataset_name} examples dropped: chosen and rejected are the same tokens"
            f"{' after truncation' if max_length is not None else ''} ({_rows_text(rows[IDENTICAL])}), so they "
            "express no preference (trl.DPOTrainer would train them at zero sigmoid-loss gradient, diluting the "
            "batch mean).",
            stacklevel=2,
        )
    dropped = len(rows.get(PROMPT_FILLS, [])) + len(rows.get(IDENTICAL, []))
    if dropped == len(statuses):
        raise ValueError(
            f"All {dropped} examples of the {dataset_name} dataset were dropped (see the warnings above): nothing is "
            "left to train on. Raise --max_length or set --max_prompt_length."
        )
    if dropped:
        dataset = dataset.filter(
            lambda status: status in (KEEP, MOVED), input_columns=STATUS, num_proc=args.dataset_num_proc
        )
    return dataset.remove_columns(STATUS)


# ---------------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------------


def check_config(args: Any) -> None:
    """Start-up checks of the length and batch flags of a ``DPOConfig``; a ``ValueError`` naming the flag."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")
    precompute = getattr(args, "precompute_ref_batch_size", None)
    if precompute is not None and precompute < 1:
        raise ValueError(f"--precompute_ref_batch_size must be at least 1 (or unset), got {precompute}.")
    max_length, max_prompt_length = getattr(args, "max_length", None), getattr(args, "max_prompt_length", None)
    if max_length is not None and max_length < 2:
        raise ValueError(
            f"--max_length must be at least 2 (one prompt and one response token), got {max_length}. "
            "Leave it unset (None) for no limit."
        )
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            raise ValueError(
                f"--max_prompt_length must be at least 1, got {max_prompt_length}: the first response token is "
                "predicted from the last prompt token."
            )
        if max_length is None or max_prompt_length >= max_length:
            raise ValueError(
                f"--max_prompt_length ({max_prompt_length}) must be smaller than --max_length ({max_length})."
            )


def check_datasets_not_empty(
    data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None, *_: Any, **__: Any
) -> None:
    """Takes ``DPOTrainer.__init__``'s arguments after ``args`` (positional or keyword) and raises a ``ValueError``
    for an empty train or eval dataset, which TRL would meet as a bare ``StopIteration``."""
    datasets = {"train": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update(eval_dataset)
    else:
        datasets["eval"] = eval_dataset
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        empty = len(dataset) == 0 if isinstance(dataset, Dataset) else next(iter(dataset), None) is None
        if empty:
            raise ValueError(f"The {name} dataset is empty.")
