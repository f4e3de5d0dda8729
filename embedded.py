"""Offline stand-ins for everything the project would otherwise fetch from the Hugging Face Hub.

The machines this project runs on (developers', CI's, the benchmark's GPU box) cannot reach the Hub, yet the code paths
we care about (TRL's DPO preprocessing, chat templates, model forwards, loading by hub id) must be exercised for real.
This module therefore ships:

* a small byte-level BPE tokenizer with a chat template (``assets/tokenizer/``), built from the text generator below so
  that it is deterministic and any text encodes without unknown tokens;
* a synthetic preference data set in the schema of ``argilla/distilabel-capybara-dpo-7k-binarized`` whose shape (long
  shared multi-turn prompts, short responses) is the case prefix sharing is meant to speed up;
* tiny model configs/models for the architectures we support;
* ``write_local_stand_ins`` which lays these out under the hub ids so that unmodified command lines resolve to them.

Run ``python embedded.py build-tokenizer`` to regenerate the shipped tokenizer, ``python embedded.py stand-ins ROOT``
to write the local stand-ins and ``python embedded.py stats`` to print token-length statistics of the default data set.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import random
import shutil
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if (
    TYPE_CHECKING
):  # heavy imports stay lazy at run time; annotations are strings (``from __future__ import annotations``)
    from datasets import Dataset, Features
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
END_TOKEN = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
CHAT_MARKERS = [*ROLE_TOKENS.values(), END_TOKEN]
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *CHAT_MARKERS]
TOKENIZER_VOCAB_SIZE = 3072
MODEL_MAX_LENGTH = 4096

# The generation prompt ends with "<|assistant|>\n" and message contents are trimmed, so the completion always starts
# with a non-space character right after a lone "\n". The byte-level pre-tokenizer splits "\n" from a following
# non-space character, hence no BPE merge can cross the prompt/completion boundary and the tokenized prompt is an exact
# prefix of the tokenized conversation (what TRL's DPO preprocessing relies on to split prompt and completion).
# Assistant turns end with the eos token so that the model learns to stop; nothing follows it, so the completion ids
# end with eos. Other turns end with a dedicated marker so that eos keeps meaning "end of the assistant's answer".
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + (message['content'] | trim) -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '<|end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# ---------------------------------------------------------------------------------------------------------------------
# Word-like text generator
# ---------------------------------------------------------------------------------------------------------------------
# A fixed, hand-written vocabulary keeps the text readable and makes the tokenizer (trained on the same generator)
# encode most words as one or two tokens, so "words" are a good proxy for "tokens" when choosing lengths.


def _word_list(text: str) -> list[str]:
    """Whitespace-separated words, deduplicated in order (the lists are easier to edit as plain text)."""
    return list(dict.fromkeys(text.split()))


_NOUNS = _word_list(
    """
time year people way day man woman child world life hand part place case week company system program question work
government number night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force education foot boy age policy
process music market sense nation plan college interest depth experience effect class control field development role
effort rate heart disk show leader light voice wife police mind price report decision son view relationship town road
arm difference value building action model season society tax director position player record paper space ground form
event official matter center couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair window evidence population
site garden river mountain island bridge engine signal network memory pattern layer token vector matrix kernel batch
gradient tensor server cluster query answer method theory energy planet ocean forest animal plant metal stone glass
"""
)

_VERBS = _word_list(
    """
be have do say get make go know take see come think look want give use find tell ask work seem feel try leave call
need become mean keep let begin help talk turn start show hear play run move like live believe hold bring happen write
provide sit stand lose pay meet include continue set learn change lead understand watch follow stop create speak read
allow add spend grow open walk win offer remember consider appear buy wait serve dry send expect build stay fall cut
reach fill remain suggest raise pass sell require report decide pull explain compute measure train predict compare
describe improve reduce increase store load share split merge sort filter count solve check design
"""
)

_ADJECTIVES = _word_list(
    """
good new first last long great little own other old right big high different small large next early young important
few public bad same able free sure clear full special easy strong certain real best whole hard low late general
simple recent late major personal current national natural physical short common single final open similar quick
heavy bright dark quiet loud warm cold fresh deep wide narrow careful rapid steady random sparse dense linear
"""
)

_ADVERBS = _word_list(
    """
also very often however too usually really early never always sometimes together likely simply generally instead
actually again rather almost especially ever quickly probably already below directly therefore else thus easily
"""
)

_PREPOSITIONS = _word_list(
    "of in to for with on at from by about into over after under between through during without"
)
_DETERMINERS = _word_list("the a this that every each some any another our their its")
_CONJUNCTIONS = _word_list("and but or so because while although")
_QUESTION_WORDS = _word_list("how why when where what which")
_REQUESTS = [
    "Can you explain",
    "Please describe",
    "Could you compare",
    "Tell me about",
    "Write a short note on",
    "Summarize",
    "What do you know about",
    "Give an example of",
]

WORDS: list[str] = sorted(
    set(_NOUNS + _VERBS + _ADJECTIVES + _ADVERBS + _PREPOSITIONS + _DETERMINERS + _CONJUNCTIONS + _QUESTION_WORDS)
)


def _third_person(verb: str) -> str:
    """Conjugate crudely: the point is word-like variety, not grammar."""
    if verb == "be":
        return "is"
    if verb == "have":
        return "has"
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _number(rng: random.Random) -> str:
    """Numbers in a few common shapes (integers, decimals, years, percentages) so digits show up in the text."""
    shape = rng.random()
    if shape < 0.4:
        return str(rng.randint(0, 100))
    if shape < 0.6:
        return f"{rng.uniform(0, 100):.{rng.randint(1, 2)}f}"
    if shape < 0.8:
        return str(rng.randint(1900, 2030))
    if shape < 0.9:
        return f"{rng.randint(1, 99)}%"
    return str(rng.randint(100, 99999))


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.45:
        words.append(rng.choice(_ADJECTIVES))
    if rng.random() < 0.1:
        words.append(_number(rng))
    words.append(rng.choice(_NOUNS))
    return words


def _statement(rng: random.Random) -> list[str]:
    words = _noun_phrase(rng)
    if rng.random() < 0.25:
        words.append(rng.choice(_ADVERBS))
    words.append(_third_person(rng.choice(_VERBS)))
    words += _noun_phrase(rng)
    while rng.random() < 0.45:
        words.append(rng.choice(_PREPOSITIONS))
        words += _noun_phrase(rng)
    if rng.random() < 0.25:
        words[-1] += ","
        words.append(rng.choice(_CONJUNCTIONS))
        words += _statement(rng)[:-1] if rng.random() < 0.5 else _noun_phrase(rng)
    return words


def _sentence(rng: random.Random, question: bool = False) -> list[str]:
    """One sentence as a list of words, the first capitalized and the last carrying the punctuation."""
    roll = rng.random()
    if question and roll < 0.5:
        words = [rng.choice(_QUESTION_WORDS), rng.choice(["does", "can", "should", "will"])]
        words += _noun_phrase(rng)
        words.append(rng.choice(_VERBS))
        words += _noun_phrase(rng)
        end = "?"
    elif question and roll < 0.8:
        words = rng.choice(_REQUESTS).split() + _noun_phrase(rng)
        if rng.random() < 0.5:
            words.append(rng.choice(_PREPOSITIONS))
            words += _noun_phrase(rng)
        end = rng.choice(["?", "."]) if words[0] in ("Can", "Could", "What") else "."
    else:
        words = _statement(rng)
        end = "!" if rng.random() < 0.03 else "."
    words[0] = words[0][:1].upper() + words[0][1:]
    words[-1] = words[-1].rstrip(",") + end
    return words


def generate_text(rng: random.Random, num_words: int, question: bool = False) -> str:
    """Generate about ``num_words`` words of sentences, grouped into paragraphs and occasional bullet lists.

    The word count is exact: the last sentence is cut short (and closed with a period) so callers control lengths.
    The result never starts or ends with whitespace, which the chat template's ``trim`` would otherwise change.
    """
    num_words = max(1, num_words)
    pieces: list[str] = []
    count = 0
    sentences_in_paragraph = 0
    while count < num_words:
        is_question = question and (count == 0 or rng.random() < 0.3)
        words = _sentence(rng, is_question)[: num_words - count]
        if words[-1][-1:] not in ".?!":
            words[-1] = words[-1].rstrip(",") + "."
        count += len(words)
        text = " ".join(words)
        if pieces:
            if sentences_in_paragraph >= 3 and rng.random() < 0.25:
                separator = "\n\n"
                sentences_in_paragraph = 0
            elif rng.random() < 0.04:
                separator = "\n- "
            else:
                separator = " "
            pieces.append(separator)
        pieces.append(text)
        sentences_in_paragraph += 1
    return "".join(pieces)


def _tokenizer_training_corpus(num_paragraphs: int = 4000) -> Iterator[str]:
    """Text the BPE is trained on: the same generator as the data sets, plus the plain-text role prefixes."""
    rng = random.Random(1234)
    for index in range(num_paragraphs):
        role = ("System", "User", "Assistant")[index % 3]
        yield f"{role}: " + generate_text(rng, rng.randint(20, 120), question=role == "User")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def build_tokenizer(out_dir: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerBase:
    """Train the byte-level BPE tokenizer and ``save_pretrained`` it to ``out_dir``; returns the tokenizer.

    Byte level, so any string (not only generated text) encodes without unknown tokens and decodes back exactly.
    The trainer's input and settings are fixed, so the files are identical on every run and can be checked in.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_training_corpus(), trainer=trainer)
    # Plain-text encoding (TRL's non-conversational path) prepends bos like Llama-family tokenizers; the chat template
    # writes bos itself and apply_chat_template encodes without special tokens, so it is never doubled.
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=CHAT_MARKERS,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(path: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerBase:
    """Load the shipped tokenizer (a fresh instance each call, since callers may mutate it, e.g. padding side)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@functools.cache
def _tokenizer_ids() -> dict[str, int]:
    """The ids model configs need; cached because loading the tokenizer for every tiny config is wasted time."""
    tokenizer = load_tokenizer()
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def chat_template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, as TRL's DPO preprocessing computes them.

    transformers 5 returns a ``BatchEncoding`` from ``apply_chat_template(tokenize=True)``; this unwraps it so callers
    get a flat list whatever the version.
    """
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


# ---------------------------------------------------------------------------------------------------------------------
# Preference data set
# ---------------------------------------------------------------------------------------------------------------------

_SOURCES = ["Know-Logic", "EverythingLM", "General-Instruct", "Dove", "Airoboros", "GPT4LLM", "TheoremQA", "SuperCOT"]
_MODELS = ["gpt4", "gpt-3.5-turbo", "mistral-7b-instruct", "llama-2-13b-chat", "openhermes-2.5", "notus-7b"]


def _log_uniform_int(rng: random.Random, bounds: tuple[int, int]) -> int:
    """Sample lengths log-uniformly: many short, a long tail, like real chat data (and deterministic per seed)."""
    lo, hi = bounds
    if lo > hi or lo < 1:
        raise ValueError(f"length bounds must satisfy 1 <= lo <= hi, got {bounds}")
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def _split_words(rng: random.Random, total: int, parts: int, minimum: int = 3) -> list[int]:
    """Split a word budget over the shared messages, unevenly, giving every message at least ``minimum`` words."""
    weights = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    scale = sum(weights)
    return [max(minimum, round(total * weight / scale)) for weight in weights]


_HELPFUL_OPENERS = ("Sure, happy to help.", "Good question.", "Here is a careful answer.")
_DISMISSIVE_OPENERS = ("Whatever.", "No idea, figure it out.", "Not my problem.")


def _shared_turns(
    rng: random.Random, prompt_words: tuple[int, int], turns: tuple[int, int], system_prob: float
) -> list[dict[str, str]]:
    """The conversation before the final answer: 1-N user turns (earlier ones answered), maybe a system message."""
    num_turns = rng.randint(*turns)
    shared_words = _log_uniform_int(rng, prompt_words)
    roles = ["user", "assistant"] * (num_turns - 1) + ["user"]
    if rng.random() < system_prob:
        roles.insert(0, "system")
    return [
        {"role": role, "content": generate_text(rng, count, question=role == "user")}
        for role, count in zip(roles, _split_words(rng, shared_words, len(roles)), strict=True)
    ]


def _response(
    rng: random.Random, openers: tuple[str, ...], response_words: tuple[int, int], short_response_prob: float
) -> str:
    count = rng.randint(1, 3) if rng.random() < short_response_prob else _log_uniform_int(rng, response_words)
    opener = rng.choice(openers)
    opener_words = len(opener.split())
    if count <= opener_words:
        return generate_text(rng, count)
    return f"{opener} {generate_text(rng, count - opener_words)}"


def _make_example(
    rng: random.Random,
    prompt_words: tuple[int, int],
    response_words: tuple[int, int],
    turns: tuple[int, int],
    short_response_prob: float,
    system_prob: float,
) -> dict[str, Any]:
    shared = _shared_turns(rng, prompt_words, turns, system_prob)
    # A learnable preference, so that a short demo run shows DPO at work: chosen replies open helpfully, rejected
    # ones dismissively; the opener counts towards the reply's words, and the rest is random text.
    chosen_text = _response(rng, _HELPFUL_OPENERS, response_words, short_response_prob)
    rejected_text = _response(rng, _DISMISSIVE_OPENERS, response_words, short_response_prob)
    return _preference_row(rng, shared, chosen_text, rejected_text)


def _preference_row(
    rng: random.Random, shared: list[dict[str, str]], chosen_text: str, rejected_text: str
) -> dict[str, Any]:
    """A Capybara row: the conversation ``shared`` answered two ways, with ratings and models drawn from ``rng``."""
    if rejected_text == chosen_text:  # only possible for very short responses; a pair must differ to be a preference
        rejected_text = "No."
    chosen_rating = rng.randint(2, 5)
    chosen_model, rejected_model = rng.sample(_MODELS, 2)
    return {
        "source": rng.choice(_SOURCES),
        "prompt": next(message["content"] for message in shared if message["role"] == "user"),
        "chosen": [*shared, {"role": "assistant", "content": chosen_text}],
        "chosen_rating": chosen_rating,
        "chosen_model": chosen_model,
        "rejected": [*shared, {"role": "assistant", "content": rejected_text}],
        "rejected_rating": rng.randint(1, chosen_rating - 1),
        "rejected_model": rejected_model,
    }


def _make_group(
    rng: random.Random,
    responses: int,
    prompt_words: tuple[int, int],
    response_words: tuple[int, int],
    turns: tuple[int, int],
    system_prob: float,
) -> list[dict[str, Any]]:
    shared = _shared_turns(rng, prompt_words, turns, system_prob)
    ratings = list(range(1, responses + 1))
    rng.shuffle(ratings)
    # The better half opens helpfully, the rest dismissively: every pair is a learnable preference.
    texts = [
        _response(rng, _HELPFUL_OPENERS if 2 * rating > responses else _DISMISSIVE_OPENERS, response_words, 0.0)
        for rating in ratings
    ]
    texts = [text if text not in texts[:k] else f"{text} ({k})" for k, text in enumerate(texts)]  # all distinct
    models = [rng.choice(_MODELS) for _ in range(responses)]
    source = rng.choice(_SOURCES)
    rows = []
    for first, second in itertools.combinations(range(responses), 2):
        better, worse = (first, second) if ratings[first] > ratings[second] else (second, first)
        rows.append(
            {
                "source": source,
                "prompt": next(message["content"] for message in shared if message["role"] == "user"),
                "chosen": [*shared, {"role": "assistant", "content": texts[better]}],
                "chosen_rating": ratings[better],
                "chosen_model": models[better],
                "rejected": [*shared, {"role": "assistant", "content": texts[worse]}],
                "rejected_rating": ratings[worse],
                "rejected_model": models[worse],
            }
        )
    return rows


def _make_conversation(
    rng: random.Random,
    turns: tuple[int, int],
    prompt_words: tuple[int, int],
    response_words: tuple[int, int],
    system_prompt: str | None,
) -> list[dict[str, Any]]:
    """One conversation, a row per assistant turn: the history so far (continued with the chosen answers) answered a
    helpful and a dismissive way."""
    history = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    rows = []
    for _ in range(rng.randint(*turns)):
        history.append({"role": "user", "content": generate_text(rng, _log_uniform_int(rng, prompt_words), True)})
        chosen_text = _response(rng, _HELPFUL_OPENERS, response_words, 0.0)
        rejected_text = _response(rng, _DISMISSIVE_OPENERS, response_words, 0.0)
        row = _preference_row(rng, list(history), chosen_text, rejected_text)
        rows.append(row)
        history.append(row["chosen"][-1])
    return rows


def tool_definitions(num_tools: int = 24, seed: int = 0) -> str:
    """A system prompt of tool definitions, the same for a seed: the long block that tool-use and agent data put
    before every conversation (24 tools: about 1,500 tokens with the embedded tokenizer)."""
    rng = random.Random(f"tools {seed}")
    types = ("string", "number", "boolean", "list")
    lines = ["You can call the tools below. Answer directly when no tool is needed."]
    for _ in range(num_tools):
        arguments = ", ".join(f"{rng.choice(_NOUNS)}: {rng.choice(types)}" for _ in range(rng.randint(1, 4)))
        lines.append(
            f"- {rng.choice(_VERBS)}_{rng.choice(_NOUNS)}({arguments}): {generate_text(rng, rng.randint(12, 40))}"
        )
    return "\n".join(lines)


def _plain_text(example: dict[str, Any]) -> dict[str, str]:
    """Flatten a Capybara example into TRL's standard (non-conversational) prompt/chosen/rejected strings.

    The prompt ends with "Assistant:" and completions start with a space, a boundary the byte-level pre-tokenizer
    always splits at, so the tokenized prompt stays a prefix of the tokenized prompt + completion here too.
    """
    shared = example["chosen"][:-1]
    prompt = "".join(f"{message['role'].capitalize()}: {message['content']}\n\n" for message in shared)
    return {
        "prompt": prompt + "Assistant:",
        "chosen": " " + example["chosen"][-1]["content"],
        "rejected": " " + example["rejected"][-1]["content"],
    }


def capybara_features() -> Features:
    """The ``datasets`` features of the Capybara DPO data set (messages as role/content structs, integer ratings)."""
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    return Features(
        {
            "source": Value("string"),
            "prompt": Value("string"),
            "chosen": messages,
            "chosen_rating": Value("int64"),
            "chosen_model": Value("string"),
            "rejected": messages,
            "rejected_rating": Value("int64"),
            "rejected_model": Value("string"),
        }
    )


def make_preference_dataset(
    num_examples: int,
    seed: int = 0,
    conversational: bool = True,
    prompt_words: tuple[int, int] = (60, 600),
    response_words: tuple[int, int] = (6, 90),
    turns: tuple[int, int] = (1, 4),
    short_response_prob: float = 0.05,
    system_prob: float = 0.0,
    system_prompt: str | None = None,
) -> Dataset:
    """Build a synthetic multi-turn preference data set in the Capybara DPO schema.

    The default shape (a shared conversation of a few hundred tokens over 1-4 user turns, final answers of tens of
    tokens) is what makes prefix sharing pay off, so the benchmarks and tests see realistic proportions offline.

    Args:
        num_examples: Number of rows.
        seed: Every row is drawn from its own generator seeded by (seed, index), so a data set with more rows starts
            with the rows of a smaller one and any row can be reproduced alone.
        conversational: Capybara schema when True (``prompt`` is the first user turn, ``chosen``/``rejected`` the whole
            conversations, differing only in the final assistant turn). When False, TRL's standard plain-text
            schema: ``prompt``, ``chosen`` and ``rejected`` strings, the latter two being the completions only.
        prompt_words: Bounds of the total word count of the shared conversation, drawn log-uniformly.
        response_words: Bounds of the word count of each final answer (chosen and rejected drawn independently).
        turns: Bounds of the number of user turns in the shared conversation (earlier turns get assistant replies).
        short_response_prob: Probability that an answer is only 1-3 words long, an edge case for the completion mask.
        system_prob: Probability that the conversation starts with a system message.
        system_prompt: A system message that starts every conversation (say :func:`tool_definitions`), drawn from
            no generator: every example starts with the same tokens.
    """

    if turns[0] < 1 or turns[0] > turns[1]:
        raise ValueError(f"turns must satisfy 1 <= lo <= hi, got {turns}")
    if system_prompt is not None and system_prob:
        raise ValueError("system_prompt starts every conversation with one system message: leave system_prob at 0")
    examples = [
        _make_example(
            random.Random(seed * 1_000_003 + index),
            prompt_words,
            response_words,
            turns,
            short_response_prob,
            system_prob,
        )
        for index in range(num_examples)
    ]
    if system_prompt is not None:
        system = {"role": "system", "content": system_prompt}
        for example in examples:
            example["chosen"], example["rejected"] = [system, *example["chosen"]], [system, *example["rejected"]]
    return _as_dataset(examples, conversational)


def _as_dataset(rows: list[dict[str, Any]], conversational: bool) -> Dataset:
    """Capybara rows as a data set in that schema, or flattened to TRL's standard plain text."""
    from datasets import Dataset

    if conversational:
        return Dataset.from_list(rows, features=capybara_features())
    return Dataset.from_list([_plain_text(row) for row in rows])


def make_multiturn_preference_dataset(
    num_conversations: int,
    turns: tuple[int, int] = (2, 6),
    seed: int = 0,
    conversational: bool = True,
    prompt_words: tuple[int, int] = (20, 120),
    response_words: tuple[int, int] = (20, 150),
    system_prompt: str | None = None,
) -> Dataset:
    """Multi-turn conversations turned into one example per assistant turn, each prompt extending the one before.

    A conversation of T user turns gives T consecutive rows: row t's prompt is the conversation up to the t-th user
    turn, its earlier assistant turns being the chosen answers of the rows before it, so that row t's prompt starts
    with row t-1's prompt and chosen answer (chosen answers open helpfully, rejected ones dismissively, as in
    :func:`make_preference_dataset`, whose schema and ``conversational`` these are). ``turns`` bounds T, drawn
    uniformly; ``prompt_words`` and ``response_words`` bound each user turn and answer, drawn log-uniformly;
    ``system_prompt`` starts every conversation. Conversations are drawn from their own generators seeded by (seed,
    conversation index), so more conversations extend fewer.
    """
    if turns[0] < 1 or turns[0] > turns[1]:
        raise ValueError(f"turns must satisfy 1 <= lo <= hi, got {turns}")
    rows = [
        row
        for index in range(num_conversations)
        for row in _make_conversation(
            random.Random(f"conversation {seed} {index}"), turns, prompt_words, response_words, system_prompt
        )
    ]
    return _as_dataset(rows, conversational)


def make_grouped_preference_dataset(
    num_prompts: int,
    responses_per_prompt: int = 4,
    seed: int = 0,
    conversational: bool = True,
    prompt_words: tuple[int, int] = (60, 600),
    response_words: tuple[int, int] = (6, 90),
    turns: tuple[int, int] = (1, 4),
    system_prob: float = 0.0,
) -> Dataset:
    """Several responses per prompt, binarized into all pairs: the shape of on-policy and iterative DPO data, and of
    datasets that keep every pair (4 responses give 6 pairs per prompt, 7 give 21).

    Each prompt's ``responses_per_prompt`` responses get distinct ratings 1..K (the better half opens helpfully, the
    rest dismissively); every two of them make a pair, the better one chosen, so each response appears in K - 1 pairs.
    A prompt's pairs are consecutive rows, in the schema of :func:`make_preference_dataset` (Capybara, or TRL's
    standard plain text with ``conversational=False``), whose arguments the others are. Prompts are drawn from their
    own generators seeded by (seed, prompt index), so more prompts extend fewer.
    """

    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt must be at least 2 to make a pair, got {responses_per_prompt}")
    rows = [
        row
        for index in range(num_prompts)
        for row in _make_group(
            random.Random(f"group {seed} {index}"),
            responses_per_prompt,
            prompt_words,
            response_words,
            turns,
            system_prob,
        )
    ]
    return _as_dataset(rows, conversational)


def trl_token_lengths(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> tuple[int, int, int]:
    """(shared prompt, chosen completion, rejected completion) token counts of a Capybara row, split as TRL does.

    TRL moves the common turns of chosen/rejected into the prompt, tokenizes it with the generation prompt and takes
    the completion as what follows the common token prefix; this mirrors that without importing TRL.
    """
    shared = example["chosen"][:-1]
    prompt_ids = chat_template_ids(tokenizer, shared, add_generation_prompt=True)
    chosen_ids = chat_template_ids(tokenizer, example["chosen"])
    rejected_ids = chat_template_ids(tokenizer, example["rejected"])
    return len(prompt_ids), len(chosen_ids) - len(prompt_ids), len(rejected_ids) - len(prompt_ids)


def token_length_stats(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, dict[str, float]]:
    """Median, 95th percentile and max of the TRL token lengths of a Capybara-schema data set."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    columns: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    for example in dataset:
        for name, length in zip(columns, trl_token_lengths(tokenizer, example), strict=True):
            columns[name].append(length)
    return {
        name: {
            "median": statistics.median(lengths),
            "p95": statistics.quantiles(lengths, n=20)[-1] if len(lengths) > 1 else float(lengths[0]),
            "min": min(lengths),
            "max": max(lengths),
        }
        for name, lengths in columns.items()
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------------------

TINY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
# Mixture-of-experts types (4 experts, top 2) and hybrid types (a convolution or Mamba-2 layer beside attention), with
# what they need beyond the common tiny sizes.
TINY_MOE_AND_HYBRID_TYPES: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {  # multi-head latent attention; layer 0 dense, layer 1 routed experts plus a shared one
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "head_dim": 8,  # the rotary part of a query, as DeepSeek-V3 uses it
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
    },
    "lfm2": {"layer_types": ["conv", "full_attention"], "conv_L_cache": 3},
    "nemotron_h": {
        "layers_block_type": ["mamba", "attention", "moe"],
        "mamba_num_heads": 8,
        "mamba_head_dim": 8,
        "mamba_n_groups": 1,
        "ssm_state_size": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "moe_shared_expert_intermediate_size": 64,
    },
}
_TINY_HEAD_DIM = 16


def tiny_model_config(model_type: str = "llama", vocab_size: int | None = None, **overrides: Any) -> PretrainedConfig:
    """A tiny config (hidden 64, 2 layers, 4 heads, 2 kv heads) of a supported architecture.

    Grouped-query attention (kv heads < heads) is kept because it is the case the attention code has to get right;
    every other architectural default (Mistral's and Gemma 2's sliding windows, Gemma 2's soft-capping, Phi-3's fused
    projections) is left as the real models have it. Mixture-of-experts and hybrid types get 4 experts (top 2) and one
    convolution or Mamba-2 layer. Token ids and the vocabulary come from the shipped tokenizer. ``overrides`` are
    passed to the config class last, so they win.
    """
    from transformers import AutoConfig

    if model_type not in (*TINY_MODEL_TYPES, *TINY_MOE_AND_HYBRID_TYPES):
        raise ValueError(
            f"unsupported model type {model_type!r}; expected one of {(*TINY_MODEL_TYPES, *TINY_MOE_AND_HYBRID_TYPES)}"
        )
    ids = _tokenizer_ids()
    kwargs: dict[str, Any] = {
        **ids,
        "vocab_size": vocab_size if vocab_size is not None else ids["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "tie_word_embeddings": False,
    }
    if model_type != "phi3":  # Phi-3 derives head_dim; Qwen3 and Gemma 2 would otherwise default to 128 and 256
        kwargs["head_dim"] = _TINY_HEAD_DIM
    if model_type == "gemma2":  # Gemma 2 scales queries by this instead of head_dim; keep it consistent with the size
        kwargs["query_pre_attn_scalar"] = _TINY_HEAD_DIM
    kwargs.update(TINY_MOE_AND_HYBRID_TYPES.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    model_type: str = "llama", seed: int = 0, attn_implementation: str | None = None, **overrides: Any
) -> PreTrainedModel:
    """A float32 ``AutoModelForCausalLM`` built from ``tiny_model_config``, identically initialized for a seed.

    The global torch RNG is forked, so building a model does not change the random stream of the caller.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_model_config(model_type, **overrides)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    return model.float().eval()


# ---------------------------------------------------------------------------------------------------------------------
# Local stand-ins for hub ids
# ---------------------------------------------------------------------------------------------------------------------

_DATASET_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
Synthetic stand-in written by `embedded.write_local_stand_ins`, in the schema of {name}.
"""


def write_local_stand_ins(
    root: str | Path,
    model_name: str = "mistralai/Mistral-7B-Instruct-v0.1",
    dataset_name: str = "argilla/distilabel-capybara-dpo-7k-binarized",
    model_type: str = "mistral",
    num_examples: int = 64,
    seed: int = 0,
) -> None:
    """Write a tiny model + tokenizer at ``root/model_name`` and a Capybara data set at ``root/dataset_name``.

    ``from_pretrained`` and ``load_dataset`` treat an existing local directory as taking precedence over a hub id, so
    a command line naming the hub ids, run with ``cwd=root``, uses these instead of downloading anything.
    """
    root = Path(root)
    model_dir = root / model_name
    tiny_model(model_type, seed=seed).save_pretrained(model_dir)
    # Copy rather than load + save_pretrained: transformers 5 writes load-time keys ("is_local", ...) into a re-saved
    # tokenizer_config.json, and a byte-identical copy is what the shipped tokenizer is.
    for source in sorted(TOKENIZER_DIR.iterdir()):
        shutil.copyfile(source, model_dir / source.name)

    dataset_dir = root / dataset_name
    (dataset_dir / "data").mkdir(parents=True, exist_ok=True)
    dataset = make_preference_dataset(num_examples, seed=seed)
    dataset.to_parquet(str(dataset_dir / "data" / "train-00000-of-00001.parquet"))
    (dataset_dir / "README.md").write_text(_DATASET_CARD.format(name=dataset_name))


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(part) for part in text.split(","))
    return lo, hi


def main(argv: Sequence[str] | None = None) -> None:
    """``build-tokenizer`` / ``stand-ins`` / ``stats`` entry points, so scripts need no Python glue."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tokenizer", help="regenerate assets/tokenizer")
    build.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    stand_ins = commands.add_parser("stand-ins", help="write local stand-ins for the hub model and data set")
    stand_ins.add_argument("root", type=Path)
    stand_ins.add_argument("--model-name", default="mistralai/Mistral-7B-Instruct-v0.1")
    stand_ins.add_argument("--dataset-name", default="argilla/distilabel-capybara-dpo-7k-binarized")
    stand_ins.add_argument("--model-type", default="mistral", choices=TINY_MODEL_TYPES)
    stand_ins.add_argument("--num-examples", type=int, default=64)
    stats = commands.add_parser("stats", help="token-length statistics of a generated data set")
    stats.add_argument("--num-examples", type=int, default=1000)
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--prompt-words", type=_pair, default=(60, 600), help="lo,hi")
    stats.add_argument("--response-words", type=_pair, default=(6, 90), help="lo,hi")
    stats.add_argument("--turns", type=_pair, default=(1, 4), help="lo,hi")
    args = parser.parse_args(argv)

    if args.command == "build-tokenizer":
        tokenizer = build_tokenizer(args.out)
        print(f"wrote {args.out} ({len(tokenizer)} tokens)")
    elif args.command == "stand-ins":
        write_local_stand_ins(args.root, args.model_name, args.dataset_name, args.model_type, args.num_examples)
        print(f"wrote {args.root / args.model_name} and {args.root / args.dataset_name}")
    else:
        dataset = make_preference_dataset(
            args.num_examples,
            seed=args.seed,
            prompt_words=args.prompt_words,
            response_words=args.response_words,
            turns=args.turns,
        )
        print(json.dumps(token_length_stats(dataset), indent=2))


if __name__ == "__main__":
    main()
