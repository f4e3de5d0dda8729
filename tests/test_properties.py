"""Property tests (hypothesis) of the shared and packed layouts, over random lengths, batch sizes and packing lengths.

The layout is checked against an independent re-derivation of what standard DPO computes: every token sees exactly
the tokens it sees in the standard layout, at the same position (under a sliding window, exactly those of the last
``window`` standard positions), and every completion token of TRL's standard batch
is read from the hidden state of its standard predecessor (``score_index`` through ``score_inverse``), the head
scoring each distinct (state, label) once. The log-prob test runs a tiny
context-sensitive float32 Llama through the project's shared forward (``add_shared_forward`` on TRL's fused LM head)
and through TRL's standard forward on the same batch.
"""

import functools
import random
from dataclasses import dataclass

import torch
from dpo_harness import tree_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl.trainer.utils import add_fused_lm_head

import collators
from collators import PADDING_SEQUENCE, RESPONSES, PrefixSharingCollator, dense_mask, shared_sequence_length
from embedded import tiny_model
from packing import next_fit
from prefix_dpo_trainer import add_shared_forward

PAD = 0
# Sliding windows: none (full attention), or from one token (each sees itself only) to longer than every sequence.
WINDOWS = st.one_of(st.none(), st.integers(1, 16))
VOCAB = (16, 2000)  # token ids drawn from here: no special tokens, all in the tiny model's vocabulary (2074)


@dataclass
class Case:
    examples: list[dict[str, list[int]]]
    share_prompt: bool
    packing_length: int | None
    pad_to_multiple_of: int | None


@st.composite
def cases(draw: st.DrawFn, max_examples: int = 5, max_tokens: int = 7) -> Case:
    lengths = draw(
        st.lists(st.tuples(*[st.integers(1, max_tokens)] * 3), min_size=1, max_size=max_examples), label="lengths"
    )
    rng = random.Random(draw(st.integers(0, 2**32 - 1), label="seed"))
    # No token twice: no two sequences start alike beyond their own prompt, so the layout is the paper's, which
    # expected_spans re-derives (tests/test_trees.py covers sequences that share more).
    tokens = iter(rng.sample(range(*VOCAB), sum(map(sum, lengths))))
    examples = [
        {
            name: [next(tokens) for _ in range(n)]
            for name, n in zip(("prompt_ids", "chosen_ids", "rejected_ids"), ls, strict=True)
        }
        for ls in lengths
    ]
    share_prompt = draw(st.booleans(), label="share_prompt")
    packing_length = pad_to_multiple_of = None
    if draw(st.booleans(), label="packed"):
        longest = max(shared_sequence_length(example, share_prompt) for example in examples)
        packing_length = longest + draw(st.integers(0, 3 * max_tokens * 3), label="packing slack")
    else:
        pad_to_multiple_of = draw(st.sampled_from([None, 1, 8, 128]), label="pad_to_multiple_of")
    return Case(examples, share_prompt, packing_length, pad_to_multiple_of)


def collate(case: Case) -> dict:
    collator = PrefixSharingCollator(
        pad_token_id=PAD,
        shared_pad_to_multiple_of=case.pad_to_multiple_of,
        packing_length=case.packing_length,
        share_prompt=case.share_prompt,
    )
    return collator(case.examples)


def expected_spans(case: Case, sequence_ids: torch.Tensor) -> list[dict]:
    """Where each example's prompt copies and responses must lie, re-derived from the example lengths alone.

    The packer chooses which examples share a row; given how many documents each row holds, the examples follow one
    another from the row's start in dataset order, ``prompt | chosen | rejected`` (or ``prompt | chosen`` and
    ``prompt | rejected`` as two documents without prefix sharing).
    """
    per_example = 1 if case.share_prompt else 2
    documents = [len(set(row.tolist()) - {PADDING_SEQUENCE}) for row in sequence_ids]
    assert all(count % per_example == 0 and count > 0 for count in documents)
    spans, example = [], 0
    length = sequence_ids.shape[1]
    for row, count in enumerate(documents):
        start = row * length
        for _ in range(count // per_example):
            e = case.examples[example]
            p, c = len(e["prompt_ids"]), len(e["chosen_ids"])
            if case.share_prompt:
                span = {
                    "chosen_prompt": start,
                    "chosen": start + p,
                    "rejected_prompt": start,
                    "rejected": start + p + c,
                }
            else:
                span = {
                    "chosen_prompt": start,
                    "chosen": start + p,
                    "rejected_prompt": start + p + c,
                    "rejected": start + 2 * p + c,
                }
            spans.append(span)
            start += shared_sequence_length(e, case.share_prompt)
            example += 1
    assert example == len(case.examples), "every example is laid out exactly once"
    return spans


def window_start(upto: int, window: int | None) -> int:
    """The first standard position that the token at ``upto`` sees: ``window`` positions back, itself included."""
    return 0 if window is None else max(0, upto + 1 - window)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(cases(), WINDOWS)
def test_layout_matches_the_standard_one(case: Case, window: int | None) -> None:
    batch = collate(case)
    shared = batch["shared_inputs"]
    ids, positions = shared["input_ids"].flatten(), shared["position_ids"].flatten()
    sequences = shared["sequence_ids"].flatten()
    rows, length = shared["input_ids"].shape
    if case.packing_length is not None:
        assert length == case.packing_length
    elif case.pad_to_multiple_of:
        assert length % case.pad_to_multiple_of == 0
    mask = dense_mask(shared)[:, 0]  # (rows, query, key)
    windowed = dense_mask(shared, window)[:, 0]
    spans = expected_spans(case, shared["sequence_ids"])

    # Every token: its id, its standard position, and exactly the keys it sees in the standard layout.
    real = torch.zeros(rows * length, dtype=torch.bool)
    for example, span in zip(case.examples, spans, strict=True):
        prompt = example["prompt_ids"]
        p = len(prompt)
        for branch in ("chosen", "rejected"):
            response = example[f"{branch}_ids"]
            prompt_at, response_at = span[f"{branch}_prompt"], span[branch]
            sequence = [*range(prompt_at, prompt_at + p), *range(response_at, response_at + len(response))]
            assert ids[sequence].tolist() == prompt + response
            assert positions[sequence].tolist() == list(range(p + len(response)))
            real[sequence] = True
            for upto, flat in enumerate(sequence):
                row, query = divmod(flat, length)
                seen = (mask[row, query].nonzero().flatten() + row * length).tolist()
                assert seen == sorted(sequence[: upto + 1]), (branch, upto)
                in_window = (windowed[row, query].nonzero().flatten() + row * length).tolist()
                assert in_window == sorted(sequence[window_start(upto, window) : upto + 1]), (branch, upto, window)
    # No query is fully masked (every token sees at least itself), so no softmax row is empty, padding included.
    assert mask.diagonal(dim1=1, dim2=2).all() and windowed.diagonal(dim1=1, dim2=2).all()
    # A window only takes keys away, so what holds for padding below holds under it.
    assert not (windowed & ~mask).any()
    # Padding: nothing real sees it, it sees nothing real.
    assert (sequences[~real] == PADDING_SEQUENCE).all() and (sequences[real] != PADDING_SEQUENCE).all()
    padding = (~real).view(rows, length)
    realr = real.view(rows, length)
    assert not (mask & realr[:, :, None] & padding[:, None, :]).any()
    assert not (mask & padding[:, :, None] & realr[:, None, :]).any()

    # The reads against TRL's standard batch: every completion token once, chosen rows first, row-major, each read
    # at the state of its standard predecessor, whose logical successor in the shared layout is the label.
    completion = batch["completion_mask"].bool()
    completion[:, 0] = False
    labels = batch["input_ids"][completion]
    predecessors = batch["input_ids"][:, :-1][completion[:, 1:]]
    score_index = shared["score_index"][shared["score_inverse"]]
    assert len(score_index) == len(labels)
    # The head scores each distinct (state, label) once.
    assert len(shared["score_index"]) == len(set(zip(score_index.tolist(), labels.tolist(), strict=True)))
    assert ids[score_index].tolist() == predecessors.tolist()
    successors = []
    for branch in ("chosen", "rejected"):
        for example, span in zip(case.examples, spans, strict=True):
            response = example[f"{branch}_ids"]
            successors += range(span[branch], span[branch] + len(response))
    assert len(set(successors)) == len(successors) == len(score_index)
    assert ids[successors].tolist() == labels.tolist()
    assert (positions[successors] == positions[score_index] + 1).all()
    assert (sequences[successors] == sequences[score_index]).all()
    # The successor sees its predecessor: they belong to the same standard sequence.
    rows_of, cols_of = torch.tensor(successors) // length, torch.tensor(successors) % length
    assert mask[rows_of, cols_of, score_index % length].all()


@functools.cache
def scoring_model(attn_implementation: str) -> torch.nn.Module:
    model = tiny_model("llama", seed=0, initializer_range=0.2, attn_implementation=attn_implementation)
    add_fused_lm_head(model)
    add_shared_forward(model)
    return model


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_examples=4, max_tokens=6), st.sampled_from(["sdpa", "eager"]))
def test_log_probs_match_the_standard_forward(case: Case, attn_implementation: str) -> None:
    batch = collate(case)
    model = scoring_model(attn_implementation)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    standard_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        standard = model(**standard_inputs, labels=labels, fused_lm_head=True, use_cache=False)
        shared = model(
            **standard_inputs,
            labels=labels,
            shared_inputs=batch["shared_inputs"],
            fused_lm_head=True,
            use_cache=False,
        )
    scored = labels[:, 1:] != -100
    assert torch.equal(shared.label_mask, scored)
    # Context-sensitive weights: these log-probs move by far more than the tolerance when the context is wrong.
    torch.testing.assert_close(shared.log_probs[scored], standard.log_probs[scored], rtol=1e-5, atol=2e-5)
    assert (shared.log_probs[~scored] == 0).all()


@dataclass
class GroupCase:
    examples: list[dict[str, list[int]]]
    packing_length: int | None
    score: str


@st.composite
def group_cases(draw: st.DrawFn) -> GroupCase:
    """Pairs drawn from a few prompts with a few responses each, so that pairs share prompts and responses."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1), label="seed"))
    prompts = [[rng.randrange(*VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(draw(st.integers(1, 3)))]
    responses = [[[rng.randrange(*VOCAB) for _ in range(rng.randint(1, 5))] for _ in range(4)] for _ in prompts]
    examples = []
    for _ in range(draw(st.integers(1, 7), label="pairs")):
        prompt = draw(st.integers(0, len(prompts) - 1))
        chosen, rejected = draw(st.lists(st.integers(0, 3), min_size=2, max_size=2, unique=True))
        examples.append(
            {
                "prompt_ids": prompts[prompt],
                "chosen_ids": responses[prompt][chosen],
                "rejected_ids": responses[prompt][rejected],
            }
        )
    packing_length = None
    if draw(st.booleans(), label="packed"):
        packing_length = max(shared_sequence_length(e) for e in examples) + draw(st.integers(0, 30))
    return GroupCase(examples, packing_length, draw(st.sampled_from(["next_token", "last_token"])))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(group_cases(), WINDOWS)
def test_group_layout_every_scored_state_sees_exactly_its_standard_prefix(case: GroupCase, window: int | None) -> None:
    """Independently of how groups are laid out: each state ``score_index`` points at holds its standard sequence's
    token at its standard position and sees exactly that sequence's earlier tokens, at their standard positions;
    under a sliding window, exactly those of the last ``window`` positions."""
    collator = PrefixSharingCollator(pad_token_id=PAD, packing_length=case.packing_length)
    examples = case.examples
    if case.packing_length:
        prompts = [tuple(example["prompt_ids"]) for example in examples]
        rows = next_fit(collators.layout_sizes(examples), case.packing_length, prompts)
    else:
        rows = collators.prompt_rows(examples)
    shared = collators.build_shared_inputs(examples, rows, PAD, length=case.packing_length, score=case.score)
    ids, positions = shared["input_ids"].flatten(), shared["position_ids"].flatten()
    length = shared["input_ids"].shape[1]
    mask = dense_mask(shared, window)[:, 0]
    read_states = shared["score_index"][shared["score_inverse"]].tolist()
    scored = iter(read_states)
    read_labels = []
    for column in ("chosen_ids", "rejected_ids"):
        for example in examples:
            tokens = example["prompt_ids"] + example[column]
            p = len(example["prompt_ids"])
            reads = range(p - 1, len(tokens) - 1) if case.score == "next_token" else [len(tokens) - 1]
            for position in reads:
                flat = next(scored)
                read_labels.append(tokens[position + 1] if case.score == "next_token" else None)
                assert (positions[flat].item(), ids[flat].item()) == (position, tokens[position])
                row, query = divmod(flat, length)
                keys = mask[row, query].nonzero().flatten() + row * length
                seen = sorted(zip(positions[keys].tolist(), ids[keys].tolist(), strict=True))
                first = window_start(position, window)
                assert seen == list(enumerate(tokens[: position + 1]))[first:]
    assert next(scored, None) is None
    # Each distinct read once: a (state, label), or a state for the last token.
    assert len(shared["score_index"]) == len(set(zip(read_states, read_labels, strict=True)))
    # Every distinct prefix of a row's sequences once (the tree's token count), at most the grouped count (every
    # prompt and every distinct response of a row once).
    for row, sequence_ids in zip(rows, shared["sequence_ids"], strict=True):
        tokens = tree_tokens([examples[i]["prompt_ids"] + examples[i][column] for i in row for column in RESPONSES])
        groups: dict[tuple, set] = {}
        for index in row:
            e = examples[index]
            groups.setdefault(tuple(e["prompt_ids"]), set()).update({tuple(e[column]) for column in RESPONSES})
        grouped = sum(len(prompt) + sum(map(len, responses)) for prompt, responses in groups.items())
        assert int((sequence_ids >= 0).sum()) == tokens <= grouped
    assert torch.equal(collator(examples)["shared_inputs"]["input_ids"], shared["input_ids"])
