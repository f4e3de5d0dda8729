"""Tests of the offline stand-ins in ``embedded.py``: everything else in the project is tested on top of them, so a
tokenizer that merges across the prompt/completion boundary or a data set that drifts would silently skew the rest."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

# Importable however pytest is invoked (plain `pytest` puts tests/, not the repo root, on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
embedded = importlib.import_module("embedded")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return embedded.load_tokenizer()


def test_shipped_tokenizer_files_are_small_and_reproducible(tmp_path: Path) -> None:
    shipped = sorted(embedded.TOKENIZER_DIR.iterdir())
    assert {path.name for path in shipped} >= {"tokenizer.json", "tokenizer_config.json"}
    assert sum(path.stat().st_size for path in shipped) < 1_000_000
    embedded.build_tokenizer(tmp_path)
    for path in shipped:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs: rebuild the tokenizer"


def test_tokenizer_special_tokens_and_size(tokenizer: PreTrainedTokenizerBase) -> None:
    assert 2000 <= len(tokenizer) <= 4000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids |= set(tokenizer.convert_tokens_to_ids(embedded.CHAT_MARKERS))
    assert len(ids) == 3 + len(embedded.CHAT_MARKERS)
    assert tokenizer.unk_token_id is None
    assert tokenizer.chat_template == embedded.CHAT_TEMPLATE


@pytest.mark.parametrize(
    "text",
    [
        "Hello world!",
        "  leading and trailing spaces  ",
        "Numbers 3.14, 2024 and 99%.\n\n- a bullet\n\ttab",
        "Ünïcödé ☃ 日本語 emoji 🙂 and <not special>",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    with_special = tokenizer(text)["input_ids"]
    assert with_special == [tokenizer.bos_token_id, *ids]
    assert tokenizer.decode(with_special, skip_special_tokens=True) == text


def test_tokenizer_round_trip_generated_text(tokenizer: PreTrainedTokenizerBase) -> None:
    import random

    rng = random.Random(7)
    for _ in range(20):
        text = embedded.generate_text(rng, rng.randint(1, 200), question=rng.random() < 0.5)
        assert text == text.strip()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        # The vocabulary is trained on this generator: words should mostly be single tokens.
        assert len(ids) < 1.6 * len(text.split()) + 2


def test_chat_template_rendering(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s><|system|>\nBe brief.<|end|><|user|>\nHi?<|end|><|assistant|>\nHello.</s>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.<|end|><|user|>\nHi?<|end|><|assistant|>\n"
    with pytest.raises(Exception, match="Unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_template_prompt_is_prefix_of_conversation(tokenizer: PreTrainedTokenizerBase) -> None:
    dataset = embedded.make_preference_dataset(
        200, seed=11, system_prob=0.3, short_response_prob=0.2, prompt_words=(3, 300), turns=(1, 4)
    )
    checked = 0
    for example in dataset:
        for conversation in (example["chosen"], example["rejected"]):
            # Every assistant turn, not only the last, must split cleanly from the turns before it.
            for end, message in enumerate(conversation):
                if message["role"] != "assistant":
                    continue
                prompt, full = conversation[:end], conversation[: end + 1]
                prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                full_text = tokenizer.apply_chat_template(full, tokenize=False)
                assert full_text.startswith(prompt_text)
                prompt_ids = embedded.chat_template_ids(tokenizer, prompt, add_generation_prompt=True)
                full_ids = embedded.chat_template_ids(tokenizer, full)
                assert full_ids[: len(prompt_ids)] == prompt_ids
                completion_ids = full_ids[len(prompt_ids) :]
                assert completion_ids[-1] == tokenizer.eos_token_id
                assert tokenizer.decode(completion_ids) == message["content"] + tokenizer.eos_token
                checked += 1
    assert checked >= 400


def test_apply_chat_template_return_type_is_handled(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "One two three."}]
    raw = tokenizer.apply_chat_template(messages, tokenize=True)
    raw_ids = raw["input_ids"] if hasattr(raw, "keys") else raw
    assert embedded.chat_template_ids(tokenizer, messages) == list(raw_ids)
    assert embedded.chat_template_ids(tokenizer, messages)[0] == tokenizer.bos_token_id


def test_dataset_schema() -> None:
    dataset = embedded.make_preference_dataset(50, seed=3, system_prob=0.2)
    assert dataset.column_names == [
        "source",
        "prompt",
        "chosen",
        "chosen_rating",
        "chosen_model",
        "rejected",
        "rejected_rating",
        "rejected_model",
    ]
    assert dataset.features == embedded.capybara_features()
    for example in dataset:
        chosen, rejected = example["chosen"], example["rejected"]
        assert chosen[:-1] == rejected[:-1]
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        roles = [message["role"] for message in chosen if message["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert 1 <= len(roles) // 2 <= 4
        assert example["prompt"] == next(m["content"] for m in chosen if m["role"] == "user")
        assert all(message["content"] == message["content"].strip() != "" for message in chosen + rejected)
        assert 1 <= example["rejected_rating"] < example["chosen_rating"] <= 5
        assert example["chosen_model"] != example["rejected_model"]


def test_dataset_is_deterministic() -> None:
    first = embedded.make_preference_dataset(20, seed=5)
    assert first.to_list() == embedded.make_preference_dataset(20, seed=5).to_list()
    assert first.to_list() != embedded.make_preference_dataset(20, seed=6).to_list()
    # Rows are seeded individually, so a longer data set extends a shorter one.
    assert embedded.make_preference_dataset(30, seed=5).to_list()[:20] == first.to_list()


def test_dataset_length_parameters() -> None:
    dataset = embedded.make_preference_dataset(
        20, prompt_words=(50, 50), response_words=(7, 7), turns=(2, 2), short_response_prob=0.0
    )
    for example in dataset:
        assert len(example["chosen"]) == 4
        assert len(example["chosen"][-1]["content"].split()) == 7
        assert len(example["rejected"][-1]["content"].split()) == 7
        shared_words = sum(len(message["content"].split()) for message in example["chosen"][:-1])
        assert 45 <= shared_words <= 55
    with pytest.raises(ValueError):
        embedded.make_preference_dataset(1, turns=(0, 2))


def test_default_dataset_token_lengths(tokenizer: PreTrainedTokenizerBase) -> None:
    stats = embedded.token_length_stats(embedded.make_preference_dataset(300), tokenizer)
    assert 150 <= stats["prompt"]["median"] <= 400
    assert stats["prompt"]["max"] < 1024
    for name in ("chosen", "rejected"):
        assert 15 <= stats[name]["median"] <= 50
        assert stats[name]["min"] <= 5


def test_plain_text_dataset(tokenizer: PreTrainedTokenizerBase) -> None:
    dataset = embedded.make_preference_dataset(50, seed=2, conversational=False)
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    capybara = embedded.make_preference_dataset(50, seed=2)
    for example, conversation in zip(dataset, capybara, strict=True):
        assert example["prompt"].startswith("User: ")
        assert example["prompt"].endswith("Assistant:")
        assert example["chosen"] == " " + conversation["chosen"][-1]["content"]
        assert example["rejected"] == " " + conversation["rejected"][-1]["content"]
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        for completion in (example["chosen"], example["rejected"]):
            full_ids = tokenizer(example["prompt"] + completion + tokenizer.eos_token)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("model_type", embedded.TINY_MODEL_TYPES)
def test_tiny_model(model_type: str, tokenizer: PreTrainedTokenizerBase) -> None:
    config = embedded.tiny_model_config(model_type)
    assert config.model_type == model_type
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
    assert config.max_position_embeddings == 4096 and not config.tie_word_embeddings
    assert embedded.tiny_model_config(model_type, num_hidden_layers=3).num_hidden_layers == 3

    state = torch.random.get_rng_state()
    model = embedded.tiny_model(model_type, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    same = embedded.tiny_model(model_type, seed=1)
    other = embedded.tiny_model(model_type, seed=2)
    weights = model.get_input_embeddings().weight
    assert torch.equal(weights, same.get_input_embeddings().weight)
    assert not torch.equal(weights, other.get_input_embeddings().weight)

    conversation = embedded.make_preference_dataset(1)[0]["chosen"]
    input_ids = torch.tensor([embedded.chat_template_ids(tokenizer, conversation)[:128]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_local_stand_ins_load_by_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_name = "mistralai/Mistral-7B-Instruct-v0.1"
    dataset_name = "argilla/distilabel-capybara-dpo-7k-binarized"
    root = tmp_path / "root"
    embedded.write_local_stand_ins(root, model_name, dataset_name, num_examples=16)
    monkeypatch.chdir(root)

    loaded = datasets.load_dataset(dataset_name, cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == ["train"]
    assert loaded["train"].features == embedded.capybara_features()
    assert loaded["train"].to_list() == embedded.make_preference_dataset(16).to_list()

    model = AutoModelForCausalLM.from_pretrained(model_name)
    assert type(model).__name__ == "MistralForCausalLM"
    reference = embedded.tiny_model("mistral")
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    shipped = embedded.load_tokenizer()
    conversation = loaded["train"][0]["chosen"]
    assert embedded.chat_template_ids(tokenizer, conversation) == embedded.chat_template_ids(shipped, conversation)
    assert tokenizer.chat_template == shipped.chat_template


def test_tool_definitions_start_every_conversation(tokenizer: PreTrainedTokenizerBase) -> None:
    """The system-prompt shape of the prefix-tree benchmark: one long block on every row, then differing prompts."""
    tools = embedded.tool_definitions()
    assert tools == embedded.tool_definitions(seed=0) != embedded.tool_definitions(seed=1)
    system = embedded.chat_template_ids(tokenizer, [{"role": "system", "content": tools}])
    assert 1200 <= len(system) <= 1600
    dataset = embedded.make_preference_dataset(8, seed=4, system_prompt=tools)
    assert dataset.to_list()[0]["chosen"][1:] == embedded.make_preference_dataset(1, seed=4).to_list()[0]["chosen"]
    prompts = [
        embedded.chat_template_ids(tokenizer, row["chosen"][:-1], add_generation_prompt=True) for row in dataset
    ]
    for row, prompt in zip(dataset, prompts, strict=True):
        assert row["chosen"][0] == row["rejected"][0] == {"role": "system", "content": tools}
        assert prompt[: len(system)] == system
    assert len({tuple(prompt) for prompt in prompts}) == len(prompts)
    with pytest.raises(ValueError, match="system_prob"):
        embedded.make_preference_dataset(1, system_prompt=tools, system_prob=0.5)


def test_multiturn_rows_extend_the_turn_before(tokenizer: PreTrainedTokenizerBase) -> None:
    """The multi-turn shape: a row per turn, whose prompt is the previous row's prompt and chosen answer (as tokens
    too) and the next user turn."""
    dataset = embedded.make_multiturn_preference_dataset(6, turns=(2, 5), seed=1)
    assert dataset.features == embedded.capybara_features()
    rows = dataset.to_list()
    assert embedded.make_multiturn_preference_dataset(8, turns=(2, 5), seed=1).to_list()[: len(rows)] == rows
    conversations = 0
    for before, row in zip([None, *rows], rows, strict=False):
        shared = row["chosen"][:-1]
        assert shared == row["rejected"][:-1] and row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
        assert [m["role"] for m in shared] == ["user", "assistant"] * (len(shared) // 2) + ["user"]
        if len(shared) == 1:
            conversations += 1
            continue
        assert shared[:-1] == before["chosen"]
        prompt = embedded.chat_template_ids(tokenizer, shared, add_generation_prompt=True)
        earlier = embedded.chat_template_ids(tokenizer, before["chosen"])
        assert prompt[: len(earlier)] == earlier
    assert conversations == 6 and 12 <= len(rows) <= 30
    with pytest.raises(ValueError, match="turns"):
        embedded.make_multiturn_preference_dataset(1, turns=(0, 2))
