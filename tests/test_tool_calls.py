"""Tool-call conversations: assistant turns that call tools (``tool_calls``, no content), ``tool`` turns, and TRL's
``tools`` column rendered by the chat template. Stored with the ``datasets`` ``Json`` feature type (how messages of
mixed keys load from the hub) or as plain structs, they train on TRL's tokens, exactly as trl.DPOTrainer trains them,
with and without prefix sharing (float32, relative error 1e-5).
"""

import json

import pytest
from datasets import Dataset
from dpo_harness import assert_same_step, make_trainers, train_step

from embedded import load_tokenizer
from preference_data import CONVERSATIONAL, detect_schema, normalize_schema

# The shipped chat template, plus the tools (as JSON in a system turn), tool calls and tool turns.
TOOL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}{{- '<|system|>\\nTools: ' + (tools | tojson) + '<|end|>' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|user|>\\n[' + message['name'] + ' returned] ' + message['content'] + '<|end|>' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\\n' + (message['content'] or '') -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{- ' call ' + call['function']['name'] + ' ' + (call['function']['arguments'] | tojson) -}}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '<|end|>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def tool(name: str, description: str, **parameters: str) -> dict:
    properties = {key: {"type": kind, "description": key} for key, kind in parameters.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(parameters)},
        },
    }


def call(name: str, **arguments) -> dict:
    return {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
    }


def returned(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


def say(content: str) -> dict:
    return {"role": "assistant", "content": content}


def ask(content: str) -> dict:
    return {"role": "user", "content": content}


ROWS = [
    {
        "prompt": [ask("How warm is it in Lyon right now?")],
        "chosen": [call("weather", city="Lyon"), returned("weather", "18 C, light rain"), say("18 C and rainy.")],
        "rejected": [say("It is always sunny in Lyon.")],
        "tools": [tool("weather", "Current weather of a city.", city="string")],
    },
    {
        "prompt": [ask("Convert 12 miles to kilometres, then round it.")],
        "chosen": [call("convert", value=12, unit="mile"), returned("convert", "19.312"), say("About 19 km.")],
        "rejected": [call("convert", value=12, unit="km"), returned("convert", "7.456"), say("About 7 km.")],
        "tools": [tool("convert", "Converts a length to kilometres.", value="number", unit="string")],
    },
    {
        "prompt": [ask("Book the small room for the team meeting on Friday at ten.")],
        "chosen": [
            call("find_room", size="small", day="Friday"),
            returned("find_room", "room 4B is free"),
            call("book", room="4B", time="10:00"),
            returned("book", "booked"),
            say("Room 4B is booked for Friday at ten."),
        ],
        "rejected": [call("book", room="any", time="ten"), returned("book", "error: unknown room"), say("Done.")],
        "tools": [
            tool("find_room", "Finds a free meeting room.", size="string", day="string"),
            tool("book", "Books a room.", room="string", time="string"),
        ],
    },
    {
        "prompt": [{"role": "system", "content": "Answer in one sentence."}, ask("Who wrote the report?")],
        "chosen": [call("search", query="report author"), returned("search", "Dana Reyes"), say("Dana Reyes.")],
        "rejected": [say("Nobody knows.")],
        "tools": [tool("search", "Searches the document store.", query="string")],
    },
]


def tool_calls(storage: str, rows: list[dict] = ROWS) -> Dataset:
    if storage == "json":  # messages of mixed keys, as TRL's tool-call data loads from the hub
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        return Dataset.from_dict(columns, on_mixed_types="use_json")
    return Dataset.from_list(rows)  # structs: the union of the keys, None where a message lacks one


def tool_tokenizer():
    tokenizer = load_tokenizer()
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("storage", ["json", "struct"])
def test_tool_call_rows_are_conversations(storage):
    dataset = tool_calls(storage)
    if storage == "json":
        assert type(dataset.features["chosen"].feature).__name__ == "Json"
    assert detect_schema(dataset) == CONVERSATIONAL
    assert detect_schema(dataset.to_iterable_dataset()) == CONVERSATIONAL
    assert normalize_schema(dataset).to_list() == dataset.to_list()  # accepted as they are


@pytest.mark.parametrize(
    "storage, prefix_sharing, packing_length",
    [("json", False, None), ("json", True, 1280), ("struct", True, None)],
    ids=["json-standard", "json-sharing+packing", "struct-sharing"],
)
def test_tool_call_training_matches_trl(storage, prefix_sharing, packing_length):
    trl_trainer, ours = make_trainers(
        tool_calls(storage),
        tokenizer=tool_tokenizer(),
        prefix_sharing=prefix_sharing,
        packing_length=packing_length,
    )
    tokenizer = ours.processing_class
    prompt = tokenizer.decode(ours.train_dataset[2]["prompt_ids"])
    assert "Tools: " in prompt and json.dumps("find_room") in prompt  # the tools column was rendered
    chosen = tokenizer.decode(ours.train_dataset[2]["chosen_ids"])
    assert "call find_room" in chosen and "[book returned] booked" in chosen  # and the calls and tool turns
    assert ours.train_dataset.to_list() == trl_trainer.train_dataset.to_list()
    ours_step = train_step(ours)
    assert ("shared_inputs" in ours_step.batch) == (prefix_sharing or packing_length is not None)
    assert_same_step(ours_step, train_step(trl_trainer))


@pytest.mark.parametrize(
    "message, problem",
    [
        ({"role": "tool", "name": "weather", "content": None}, r"chosen\[1\] \(tool\) has no content"),
        ({"role": "assistant", "content": None, "tool_calls": []}, r"chosen\[1\] \(assistant\) has no content"),
    ],
    ids=["tool-turn-without-content", "assistant-without-content-or-calls"],
)
def test_tool_turns_still_need_content(message, problem):
    bad = {**ROWS[0], "chosen": [ROWS[0]["chosen"][0], message, ROWS[0]["chosen"][2]]}
    with pytest.raises(ValueError, match=r"row 1: " + problem):
        normalize_schema(Dataset.from_list([ROWS[0], bad], on_mixed_types="use_json"))
