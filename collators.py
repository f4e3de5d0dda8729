"""Layouts and attention masks for prefix-shared (and packed) DPO and reward-model batches.

Standard DPO runs every prompt twice, once before the chosen and once before the rejected response. Prefix sharing
runs it once, as one sequence ``prompt | chosen | rejected``, under a mask where the rejected tokens do not see the
chosen ones and their positions restart after the prompt::

    tokens     p0 p1 p2 c0 c1 r0 r1 r2          query \\ key  p0 p1 p2 c0 c1 r0 r1 r2
    positions   0  1  2  3  4  3  4  5              p0        x
    subtree end 8  8  8  5  5  8  8  8              p1        x  x
                                                    p2        x  x  x
    next-token log-probs are read at:               c0        x  x  x  x
      c0 <- p2   c1 <- c0                           c1        x  x  x  x  x
      r0 <- p2   r1 <- r0   r2 <- r1                r0        x  x  x  .  .  x
                                                    r1        x  x  x  .  .  x  x
                                                    r2        x  x  x  .  .  x  x  x

Every token then sees exactly what it sees in the standard layout, at the same position, so the log-probabilities
(and their gradients) are the standard ones. Packing puts several examples in one row; without prefix sharing each
sequence, ``prompt+chosen`` or ``prompt+rejected``, is a document of its own (``sequence_ids``).

Trees. With prefix sharing the sequences of a row (each example's ``prompt+chosen`` and ``prompt+rejected``; a reward
pair's two sequences) form a prefix tree over their token ids. A node is a run of tokens that some sequences share at
the same depth below the same parent: the model sees identical inputs there, so it computes identical states, and the
node runs once. Nodes are laid out depth first, a node's positions continue from its parent's (a position is a
depth), and every token carries its *subtree end*: the end of the span of the row that descends from its node. Each
top-level node starts a document. A key is seen by a query iff it is not after the query and the query lies before
the key's subtree end (and, for sliding-window layers, within the window in position space): a query sees exactly its
ancestors and the tokens of its node before it, its standard context. One comparison per pair, and whole blocks of the
mask decided from their extremes (``block_mask``). The rule has one more term for models that attend both ways
within an image (Gemma 3): each token is seen from its ``visible_from``, itself, or for an image token its image's
first token, instead of from itself (``vision.py``). Two examples whose prompts start with a system prompt ``s0 s1``
and then differ (``a0``, ``b0 b1``); the first one's chosen ``x0 x1`` and rejected ``x0 y1`` share their first token
(``a0 x0`` is one node: nothing branches between them)::

    tokens      s0 s1 a0 x0 x1 y1 b0 b1 c0 r0 r1      query \\ key  s0 s1 a0 x0 x1 y1 b0 b1 c0 r0 r1
    positions    0  1  2  3  4  4  2  3  4  4  5          s0        x
    subtree end 11 11  6  6  5  6 11 11  9 11 11          s1        x  x
                                                          a0        x  x  x
    s0 s1 -+- a0 x0 -+- x1                                x0        x  x  x  x
           |         +- y1                                x1        x  x  x  x  x
           +- b0 b1 -+- c0                                y1        x  x  x  x  .  x
                     +- r0 r1                             b0        x  x  .  .  .  .  x
                                                          b1        x  x  .  .  .  .  x  x
    first pair:  x0 <- a0  x1 <- x0   x0 <- a0  y1 <- x0  c0        x  x  .  .  .  .  x  x  x
    second pair: c0 <- b1   r0 <- b1  r1 <- r0            r0        x  x  .  .  .  .  x  x  .  x
                                                          r1        x  x  .  .  .  .  x  x  .  x  x

Eleven tokens run where standard DPO runs 21 and pairwise prefix sharing 14; both responses of the first pair read
``x0`` at ``a0``, scored once (``score_inverse``). Tokens merge only where their whole context is the same tokens, so
a response that is a prefix of the other, or a sequence that a later prompt extends (the turns of one conversation,
one example per turn), is the first part of a longer path. Without prefix sharing every sequence is its own tree, a
single node; ``group_prompts=False`` (the paper's pairwise layout, the benchmarks' baseline) makes every pair its own
tree: ``prompt | chosen | rejected``, except that a start the two responses share also runs once.

Groups are the depth-one case: pairs of one prompt share it, and a response that several of them hold is laid out
once, every distinct response its own branch, which sees the prompt and itself only, its positions restarting after
the prompt. Three pairs of one prompt, ``(a, b)``, ``(a, c)`` and ``(c, b)`` (chosen first), take three responses,
not six::

    tokens     p0 p1 a0 a1 b0 c0 c1 c2          query \\ key  p0 p1 a0 a1 b0 c0 c1 c2
    positions   0  1  2  3  2  2  3  4              p0        x
    subtree end 8  8  4  4  5  8  8  8              p1        x  x
                                                    a0        x  x  x
    pair (a, b): a0 <- p1  a1 <- a0   b0 <- p1      a1        x  x  x  x
    pair (a, c): a0 <- p1  a1 <- a0   c0 <- p1 ...  b0        x  x  .  .  x
    pair (c, b): c0 <- p1  c1 <- c0 ...   b0 <- p1  c0        x  x  .  .  .  x
                                                    c1        x  x  .  .  .  x  x
                                                    c2        x  x  .  .  .  x  x  x

Two pairs read the states of ``a``, scored once. TRL's batch has one chosen and one rejected row per pair.

The collators emit TRL's own standard batch (DPO: ``input_ids``, ``attention_mask``, ``completion_mask`` laid out as
``[chosen rows; rejected rows]``; reward models: ``input_ids``, ``attention_mask``, ``margin``) so that TRL's loss and
metrics run unchanged, plus ``shared_inputs``: the tensors of the single forward that replaces the standard one, and
what its head reads. For DPO the standard batch reads each completion token (in row-major order of the standard
completion mask) at the state that predicts it; for a reward model each standard sequence at the state of its last
token that is not padding, where TRL's sequence classifier reads the reward. ``score_index`` holds the flat positions
of the distinct reads, which the head scores once each: a (state, label) for DPO, so that a response several pairs
hold, or a first token the chosen and rejected responses share, is scored once for all of them; a state for a reward
model. ``score_inverse`` gives each standard read its entry in ``score_index``. A reward pair is split into prompt and
responses at the common token prefix of its chosen and rejected sequences.

The masks themselves are built on the device, in the forward, from ``subtree_end``/``position_ids``:
the collator may run in dataloader workers, and a ``BlockMask`` (which holds a closure) cannot be pickled.
"""

import hashlib
import itertools
from array import array
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PretrainedConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.reward_trainer import DataCollatorForPreference as RewardDataCollatorForPreference

from packing import Size, next_fit, row_tokens

PADDING_SEQUENCE = -1
RESPONSES = ("chosen_ids", "rejected_ids")
TOKEN_TYPE = "q"  # array typecode of a token in the bytes that prefix trees are computed on: int64
# Attention backends that take an arbitrary mask through transformers' attention interface.
MASKABLE_BACKENDS = ("flex_attention", "sdpa", "eager")
# Per-token model inputs that mark image tokens (1) among text (0), Gemma 3's `token_type_ids` and Qwen-VL's
# `mm_token_type_ids`: the shared layout carries them laid out as its tokens are (``vision.py``).
TOKEN_TYPE_FIELDS = ("token_type_ids", "mm_token_type_ids")
# What a standard sequence reads: the state predicting each completion token (DPO), or the one of its last token.
Score = Literal["next_token", "last_token"]


def round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def shared_sequence_length(example: dict[str, Sequence[int]], share_prompt: bool = True) -> int:
    """Tokens one example takes laid out alone as a pair: ``P + C + R`` shared, ``2P + C + R`` otherwise."""
    prompt, chosen, rejected = len(example["prompt_ids"]), len(example["chosen_ids"]), len(example["rejected_ids"])
    return prompt + chosen + rejected + (0 if share_prompt else prompt)


def layout_sizes(
    examples: Sequence[dict[str, Sequence[int]]], share_prompt: bool = True, group_prompts: bool = True
) -> list[Size]:
    """What each example adds to a row, as :func:`packing.next_fit` takes it.

    Grouped (prefix sharing, ``group_prompts``): the sequences of a row form one prefix tree, in which a run of tokens
    that several of its ``prompt + chosen`` and ``prompt + rejected`` sequences start with is laid out once. An
    example's parts are its two sequences cut into the edges of that tree (:func:`prefix_tree_parts`), so that the
    distinct parts of any row of these examples add up to exactly its tree tokens. Otherwise the length of the pair
    laid out alone.

    >>> from packing import row_tokens
    >>> first = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [3, 5]}
    >>> second = {"prompt_ids": [1, 2], "chosen_ids": [4], "rejected_ids": [6]}
    >>> sizes = layout_sizes([first, second])
    >>> [row_tokens([size]) for size in sizes], row_tokens(sizes)
    ([4, 4], 6)
    """
    if not (share_prompt and group_prompts):
        return [shared_sequence_length(example, share_prompt) for example in examples]
    sequences = []
    for example in examples:
        prompt = token_bytes(example["prompt_ids"])
        sequences.append([prompt + token_bytes(example[column]) for column in RESPONSES])
    return prefix_tree_parts(sequences)


def token_bytes(tokens: Sequence[int]) -> bytes:
    """A token sequence as the bytes of its int64 tokens, as :func:`prefix_tree_parts` takes it."""
    return array(TOKEN_TYPE, tokens).tobytes()


def prefix_tree_parts(examples: Sequence[Sequence[bytes]]) -> list[list[tuple[bytes, int]]]:
    """Each example's token sequences (:func:`token_bytes`) as parts ``(key, tokens)`` whose distinct ones, over any
    subset of ``examples``, add up to the tokens of the subset's prefix tree (its distinct non-empty prefixes).

    A sequence is cut wherever the prefix tree of all the given sequences branches or one of them ends: at its common
    prefix length with every other sequence, and at its own end. Then every part is a whole edge of the tree for every
    sequence through it, and a subset's tree is the union of its sequences' edges. In sorted order a sequence's common
    prefixes with those before it are the running minima of the neighbours' common prefixes (a stack holds them), and
    likewise with those after it; and its parts up to its common prefix with the sequence before it are that one's,
    so each tree token is read once to make the keys.

    A key is a digest of the whole prefix up to the part's end and of where the part starts, so equal keys mean equal
    parts also between calls, and a row's count does not depend on the order of its examples. Parts from separate
    calls (a stream sizes its examples one at a time) may cut a shared run differently and count it more than once,
    never less: a tree token lies in one part of each sequence through it, and that part's key and the token's depth
    name the token.
    """
    # Bytes are sorted, compared and hashed in C; their order is the lexicographic order of the tokens under some
    # total order of token values, which is all that the walks need.
    width = array(TOKEN_TYPE).itemsize
    numbers: dict[bytes, int] = {}
    held = [[numbers.setdefault(sequence, len(numbers)) for sequence in each if sequence] for each in examples]
    sequences = list(numbers)
    order = sorted(range(len(sequences)), key=sequences.__getitem__)
    neighbours = [common_prefix_length(sequences[a], sequences[b]) // width for a, b in itertools.pairwise(order)]
    cuts = [{len(sequence) // width} for sequence in sequences]
    for walk in (range(len(order)), range(len(order) - 1, -1, -1)):
        stack: list[int] = []  # the distinct non-zero common prefixes with the sequences walked past, increasing
        for step, at in enumerate(walk):
            if step:
                common = neighbours[min(at, walk[step - 1])]
                while stack and stack[-1] >= common:
                    stack.pop()
                if common:
                    stack.append(common)
            cuts[order[at]].update(stack)
    parts: list[list[tuple[bytes, int]]] = [[] for _ in sequences]
    path: list[tuple[int, tuple[bytes, int], Any]] = []  # the last sequence's parts: end, part, digest state at end
    for step, number in enumerate(order):
        common = neighbours[step - 1] if step else 0
        while path and path[-1][0] > common:
            path.pop()
        start = path[-1][0] if path else 0
        state = path[-1][2] if path else hashlib.blake2b(digest_size=16)
        tokens = memoryview(sequences[number])
        for end in sorted(end for end in cuts[number] if end > start):
            state = state.copy()
            state.update(tokens[start * width : end * width])
            key = state.copy()
            key.update(start.to_bytes(8, "little"))
            path.append((end, (key.digest(), end - start), state))
            start = end
        parts[number] = [part for _, part, _ in path]
    return [list(dict.fromkeys(part for number in each for part in parts[number])) for each in held]


# Unpacked, prompts that start with this many tokens in common share a row, as one tree. Each shared token saves a
# token's projections and MLP, about 24 d^2 FLOPs a layer (d: hidden size); but a dense mask (sdpa, eager) scores
# every query against every key of its row, masked or not, so two rows of n1 and n2 tokens merged cost about 2 n1 n2
# more scores of about 4 d FLOPs each. They break even near n1 n2 / (3 d) shared tokens: about 80 for two 1k-token
# examples of a 7B-sized model (d = 4096), fewer for smaller models or shorter examples. A system prompt or tool block
# is usually hundreds of tokens and gains; a BOS token or chat-template header (a few tokens) never merges rows.
# FlexAttention skips the masked blocks between the trees, so under it merging only saves.
MIN_SHARED_PREFIX = 64


def prompt_row_key(prompt_ids: Sequence[int], min_shared_prefix: int = MIN_SHARED_PREFIX) -> tuple[int, ...]:
    """Which unpacked row an example joins: examples whose keys are equal share one, as one tree. The collator lays
    out batches by it (:func:`prompt_rows`) and ``--group_by_prefix`` gathers batches by it, so that what the sampler
    puts together is what the collator merges."""
    return tuple(prompt_ids[:min_shared_prefix])


def prompt_rows(
    examples: Sequence[dict[str, Sequence[int]]],
    min_shared_prefix: int = MIN_SHARED_PREFIX,
    max_row_tokens: int | None = None,
) -> list[list[int]]:
    """The unpacked layout of a batch: a row for each set of examples whose prompts start with the same
    ``min_shared_prefix`` tokens (or are the same shorter prompt, :func:`prompt_row_key`), in order of first
    appearance. An example that would take its key's row past ``max_row_tokens`` tree tokens starts a new row for
    the key, which later examples of the key join.

    >>> prompt_rows([{"prompt_ids": [1, 2, 3]}, {"prompt_ids": [4]}, {"prompt_ids": [1, 2, 5]}], min_shared_prefix=2)
    [[0, 2], [1]]
    >>> prompt_rows([{"prompt_ids": [1, 2, 3]}, {"prompt_ids": [4]}, {"prompt_ids": [1, 2, 5]}, {"prompt_ids": [4]}])
    [[0], [1, 3], [2]]
    >>> pairs = [{"prompt_ids": [1, 2, n], "chosen_ids": [7], "rejected_ids": [8]} for n in (3, 4, 5)]
    >>> prompt_rows(pairs, min_shared_prefix=2, max_row_tokens=10)  # one pair takes 5 tokens, two 8, three 11
    [[0, 1], [2]]
    """
    # Parts cut at the tree of the whole batch, so that any subset's distinct parts add up to its tree tokens.
    sizes = None if max_row_tokens is None else layout_sizes(examples)
    rows: list[list[int]] = []
    open_row: dict[tuple[int, ...], list[int]] = {}
    for index, example in enumerate(examples):
        key = prompt_row_key(example["prompt_ids"], min_shared_prefix)
        row = open_row.get(key)
        if row is None or (sizes is not None and row_tokens([sizes[i] for i in (*row, index)]) > max_row_tokens):
            row = open_row[key] = []
            rows.append(row)
        row.append(index)
    return rows


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Length of the longest common prefix, by bisection on slices (compared in C, each element about once)."""
    low, high = 0, min(len(first), len(second))
    while low < high:  # first[:low] == second[:low], and they differ somewhere before `high + 1`
        middle = (low + high + 1) // 2
        if first[low:middle] == second[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def split_common_prefixes(examples: Sequence[dict[str, Any]]) -> list[dict[str, Sequence[int]]]:
    """Reward pairs (whole ``chosen_ids``/``rejected_ids`` sequences) as prompt and responses.

    A pair's prompt is the common token prefix of its two sequences, and pairs that hold the same sequence or have the
    same common prefix (the pairs of one prompt, in all-pairs data) take the prefix common to all their sequences, so
    that they share it even when two of their responses start alike. A prefix stops short of the last token of every
    sequence, so that each response keeps at least one token.

    >>> first = {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 3, 5]}
    >>> second = {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 6]}
    >>> [example["prompt_ids"] for example in split_common_prefixes([first])]
    [[1, 2, 3]]
    >>> [example["prompt_ids"] for example in split_common_prefixes([first, second])]
    [[1, 2], [1, 2]]
    """
    sequences = [(tuple(example["chosen_ids"]), tuple(example["rejected_ids"])) for example in examples]
    parent = list(range(len(examples)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first_holder: dict[Hashable, int] = {}
    for index, (chosen, rejected) in enumerate(sequences):
        prefix = chosen[: common_prefix_length(chosen, rejected)]
        for key in (("sequence", chosen), ("sequence", rejected), ("prefix", prefix)):
            parent[root(index)] = root(first_holder.setdefault(key, index))
    members: dict[int, list[tuple[int, ...]]] = {}
    for index, pair in enumerate(sequences):
        members.setdefault(root(index), []).extend(pair)
    shared: dict[int, int] = {}
    for group, group_sequences in members.items():
        first, *others = group_sequences
        length = min(len(sequence) for sequence in group_sequences) - 1
        for other in others:
            length = min(length, common_prefix_length(first[:length], other[:length]))
        shared[group] = max(0, length)
    split = []
    for index, (chosen, rejected) in enumerate(sequences):
        length = shared[root(index)]
        prompt = examples[index]["chosen_ids"][:length]
        split.append(
            {"prompt_ids": prompt, "chosen_ids": list(chosen[length:]), "rejected_ids": list(rejected[length:])}
        )
    return split


@dataclass(eq=False)
class _Node:
    """A run of tokens that some of a row's sequences share, at the same depth below the same parent, and the runs
    that continue it, keyed by their first token (in order of first appearance, which is the layout order)."""

    tokens: list[int]
    children: dict[int, "_Node"] = field(default_factory=dict)
    start: int = 0  # where the run lies in its row
    end: int = 0  # where its subtree's span ends


def _insert(root: _Node, sequence: list[int]) -> None:
    """Adds ``sequence`` to the trie below ``root``: it follows the runs it continues, splits the run it leaves part
    way through, and ends in a new run holding the rest. A sequence that ends inside a run (a response that is a
    prefix of another, a whole sequence that a later prompt extends) splits nothing: it is that run's first tokens."""
    node, at = root, 0
    while at < len(sequence):
        child = node.children.get(sequence[at])
        if child is None:
            node.children[sequence[at]] = _Node(sequence[at:])
            return
        shared = common_prefix_length(child.tokens, sequence[at : at + len(child.tokens)])
        if at + shared == len(sequence):
            return
        if shared < len(child.tokens):
            head = _Node(child.tokens[:shared], {child.tokens[shared]: child})
            child.tokens = child.tokens[shared:]
            node.children[sequence[at]] = child = head
        node, at = child, at + shared


def _placement(root: _Node, sequence: list[int]) -> list[int]:
    """The row offset of each token of ``sequence`` in its laid-out trie: the runs of its path, in order."""
    at: list[int] = []
    node = root
    while len(at) < len(sequence):
        node = node.children[sequence[len(at)]]
        at.extend(range(node.start, node.start + min(len(node.tokens), len(sequence) - len(at))))
    return at


def _lay_out_row(
    examples: Sequence[dict[str, Sequence[int]]], row: Sequence[int], share_prompt: bool, group_prompts: bool
) -> tuple[list[int], list[int], list[int], list[int], dict[tuple[int, str], list[int]]]:
    """One row's ids, positions, documents and subtree ends, and where each example's sequences lie in it: for every
    (example, response column), the row offset of each token of ``prompt + response``.

    The row's sequences go into tries: one for the row (prefix sharing), one per example (``group_prompts=False``:
    each pair alone) or one per sequence (``share_prompt=False``: plain packing). Each run at the top of a trie
    starts a document, laid out depth first: a run's positions continue from its parent's (a position is a depth),
    and its tokens are seen up to the end of its subtree's span.
    """
    tries: dict[Hashable, _Node] = {}
    sequences: dict[tuple[int, str], tuple[_Node, list[int]]] = {}
    for index in row:
        for column in RESPONSES:
            key = None if share_prompt and group_prompts else index if share_prompt else (index, column)
            root = tries.setdefault(key, _Node([]))
            sequence = [*examples[index]["prompt_ids"], *examples[index][column]]
            _insert(root, sequence)
            sequences[index, column] = root, sequence

    ids: list[int] = []
    positions: list[int] = []
    documents: list[int] = []
    ends: list[int] = []
    for document, top in enumerate(top for root in tries.values() for top in root.children.values()):
        laid_out: list[_Node] = []
        pending = [(top, 0)]
        while pending:
            node, depth = pending.pop()
            node.start = len(ids)
            laid_out.append(node)
            ids.extend(node.tokens)
            positions.extend(range(depth, depth + len(node.tokens)))
            pending.extend((child, depth + len(node.tokens)) for child in reversed(node.children.values()))
        documents.extend([document] * (len(ids) - len(documents)))
        for node in reversed(laid_out):  # children before their parents: a span ends where its last child's does
            last = next(reversed(node.children.values()), None)
            node.end = node.start + len(node.tokens) if last is None else last.end
        for node in laid_out:
            ends.extend([node.end] * len(node.tokens))
    placements = {key: _placement(root, sequence) for key, (root, sequence) in sequences.items()}
    return ids, positions, documents, ends, placements


def build_shared_inputs(
    examples: Sequence[dict[str, Sequence[int]]],
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    share_prompt: bool = True,
    length: int | None = None,
    pad_to_multiple_of: int | None = None,
    num_rows: int | None = None,
    score: Score = "next_token",
    group_prompts: bool = True,
    standard_width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Lays out ``examples`` (tokenized pairs) in ``rows`` (lists of example indices, each example in one) for one
    forward.

    Returns ``input_ids``, ``position_ids``, ``sequence_ids`` (document, that is tree, index in its row, -1 for
    padding), ``visible_from`` and ``subtree_end`` (for each token, the span of the row that sees it: from itself, or
    from the start of a bidirectional block it lies in, which a vision collator marks, to its subtree's end, the next
    index for padding), all ``(num_rows, length)``, and what the head reads. The standard reads are those of the
    chosen sequences of all examples in the order of ``examples``, then of the rejected ones, matching TRL's
    ``[chosen rows; rejected rows]`` batch. ``score="next_token"``: every
    completion token, read at the state that predicts it; ``"last_token"``: every sequence, read at the state of its
    last token that is not ``pad_token_id`` (its first token if there is none), where TRL's sequence classifier reads.
    ``score_index`` holds the flat index of the state of each distinct read (a (state, label) for ``"next_token"``, a
    state for ``"last_token"``), in order of first appearance, and ``score_inverse`` the entry of each standard read.
    With ``share_prompt`` the sequences of a row form one prefix tree (see the module docstring);
    ``group_prompts=False`` makes every pair its own tree instead, as the paper lays pairs out; ``share_prompt=False``
    every sequence its own document (plain packing). ``num_rows`` pads the layout with empty rows (all padding,
    nothing scored), so that a short last batch has the same shape as the others. Given the ``standard_width`` of
    TRL's standard batch (``[prompt+chosen rows; prompt+rejected rows]``, right-padded), ``standard_index`` holds for
    each token the flat index of one standard token it stands for (-1 for padding): every standard token a tree token
    stands for has the same context, so anything computed per standard token can be gathered into the layout.

    >>> example = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [3, 4]}
    >>> shared = build_shared_inputs([example], [[0]], 0)
    >>> shared["position_ids"].tolist(), shared["score_index"].tolist(), shared["score_inverse"].tolist()
    ([[0, 1, 2, 3, 4, 3, 4]], [2, 3, 2, 5], [0, 1, 2, 3])

    The two pairs below share the chosen response, scored once; state 2 predicts three different first tokens.

    >>> second = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [1]}
    >>> shared = build_shared_inputs([example, second], [[0, 1]], 0)
    >>> shared["subtree_end"].tolist(), shared["score_index"].tolist(), shared["score_inverse"].tolist()
    ([[8, 8, 8, 5, 5, 7, 7, 8]], [2, 3, 2, 5, 2], [0, 1, 0, 1, 2, 3, 4])
    """
    if sorted(index for row in rows for index in row) != list(range(len(examples))):
        raise ValueError(f"The rows must hold each of the {len(examples)} examples exactly once, got {list(rows)}.")
    if score == "next_token":
        empty = next((index for index, example in enumerate(examples) if not example["prompt_ids"]), None)
        if empty is not None:
            raise ValueError(
                f"Example {empty} has an empty prompt: its first response token is predicted from the last prompt "
                "token, so every example needs at least one."
            )
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"The batch needs {len(rows)} rows but the layout has {num_rows}.")
        rows = [*rows, *([] for _ in range(num_rows - len(rows)))]
    laid_out = [_lay_out_row(examples, row, share_prompt, group_prompts) for row in rows]
    natural = max(len(row[0]) for row in laid_out)
    if length is None:
        length = round_up(natural, pad_to_multiple_of)
    elif natural > length:
        raise ValueError(f"A row needs {natural} tokens but the layout length is {length}.")

    input_ids, position_ids, sequence_ids, subtree_end = [], [], [], []
    # Where each standard sequence's tokens lie: its row's flat offset and their offsets in the row.
    placed: dict[tuple[int, str], tuple[int, list[int]]] = {}
    for row_number, (ids, positions, sequences, ends, placements) in enumerate(laid_out):
        padding = length - len(ids)
        input_ids.append(ids + [pad_token_id] * padding)
        # Padding continues the positions so that no position exceeds the model's range more than a real token does.
        position_ids.append(positions + list(range(padding)))
        sequence_ids.append(sequences + [PADDING_SEQUENCE] * padding)
        # A padding token sees itself only: no real token sees it, and its attention row is never empty.
        subtree_end.append(ends + list(range(len(ids) + 1, length + 1)))
        placed.update({key: (row_number * length, at) for key, at in placements.items()})

    # What the head scores, once per distinct read: a (state, label) for DPO, where one state can predict several
    # labels (the last prompt token, the first token of each response); a state for a reward model.
    reads: dict[tuple[int, int | None], int] = {}
    score_inverse: list[int] = []
    for column in RESPONSES:
        for index, example in enumerate(examples):
            prompt, response = example["prompt_ids"], example[column]
            offset, at = placed[index, column]  # standard position i of this sequence lies at offset + at[i]
            if score == "next_token":
                p = len(prompt)
                sequence_reads = [(offset + at[p - 1 + i], label) for i, label in enumerate(response)]
            else:
                tokens = [*prompt, *response]
                last = max((i for i, token in enumerate(tokens) if token != pad_token_id), default=0)
                sequence_reads = [(offset + at[last], None)]
            score_inverse += [reads.setdefault(read, len(reads)) for read in sequence_reads]

    layout = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "sequence_ids": torch.tensor(sequence_ids, dtype=torch.long),
        "visible_from": torch.arange(length).repeat(len(rows), 1),
        "subtree_end": torch.tensor(subtree_end, dtype=torch.long),
        "score_index": torch.tensor([state for state, _ in reads], dtype=torch.long),
        "score_inverse": torch.tensor(score_inverse, dtype=torch.long),
    }
    if standard_width is not None:
        standard_index = torch.full((len(rows) * length,), -1, dtype=torch.long)
        for (index, column), (offset, at) in placed.items():
            row = index + (len(examples) if column == RESPONSES[1] else 0)
            standard_index[torch.tensor(at, dtype=torch.long) + offset] = torch.arange(len(at)) + row * standard_width
        layout["standard_index"] = standard_index.view(len(rows), length)
    return layout


@dataclass
class SharedLayoutCollator:
    """The fields and the layout step of the collators below (mixed into TRL's DPO and reward collators).

    Without ``packing_length`` each prompt of the batch gets a row of its own (holding all the batch's pairs of that
    prompt), and so does each set of prompts that start with the same ``min_shared_prefix`` tokens (a system prompt
    or tool block: see ``MIN_SHARED_PREFIX``), one tree per row, padded to a multiple of ``shared_pad_to_multiple_of``
    (FlexAttention's blocks are 128 tokens, so unpacked lengths come in few sizes). With it, the examples are packed
    in order into rows of exactly ``packing_length`` tokens, a new row starting when the next example does not fit,
    counting only what the row does not hold yet (its prompt, a response it already has), and consecutive pairs of one
    prompt kept in one row where they fit one (``packing.next_fit``): the packed batch sampler hands them over row by
    row. ``share_prompt=False`` packs ``prompt+chosen`` and ``prompt+rejected`` as two documents (plain DPO packing).
    ``group_prompts=False`` makes every pair its own tree, as the paper lays pairs out (the benchmark's pairwise
    baseline). ``batch_rows`` is the loader's rows per batch, which a packed batch never exceeds. ``static_rows`` (for
    compiled attention) pads every layout to that many rows, so that a short last batch compiles to no new shape; an
    unpacked batch whose pairs share rows is padded to a power of two of its rows instead (at most ``batch_rows``).
    ``max_row_tokens`` caps the tree tokens of an unpacked row that several examples share (:func:`prompt_rows`).
    Examples must already fit ``max_length``.
    """

    shared_pad_to_multiple_of: int | None = None
    packing_length: int | None = None
    share_prompt: bool = True
    group_prompts: bool = True
    batch_rows: int | None = None
    static_rows: bool = False
    min_shared_prefix: int = MIN_SHARED_PREFIX
    # The trainer sets it to the most tree tokens one example may take under `max_length`: a merged row is then never
    # longer than a row that pairwise sharing may already need, so merging never makes a longer tensor than the
    # config allows (a dense mask is quadratic in the row length), whatever the batch size. None: rows are unbounded.
    max_row_tokens: int | None = None

    def layout_rows(self, examples: Sequence[dict[str, Sequence[int]]]) -> list[list[int]]:
        """The rows ``examples`` take (lists of their indices), before any padding rows."""
        grouped = self.share_prompt and self.group_prompts
        if self.packing_length is not None:
            sizes = layout_sizes(examples, self.share_prompt, self.group_prompts)
            prompts = [tuple(example["prompt_ids"]) for example in examples] if grouped else None
            return next_fit(sizes, self.packing_length, prompts, self.batch_rows)
        if not grouped:
            return [[index] for index in range(len(examples))]
        return prompt_rows(examples, self.min_shared_prefix, self.max_row_tokens)

    def shared_inputs(
        self, examples: Sequence[dict[str, Sequence[int]]], score: Score, standard_width: int | None = None
    ) -> dict[str, torch.Tensor]:
        num_rows = self.batch_rows if self.static_rows else None
        rows = self.layout_rows(examples)
        if self.packing_length is None and num_rows is not None and len(rows) < len(examples):
            # Pairs of one prompt share rows, so the loader's batch size (in pairs) would be mostly empty rows: pad
            # to a power of two of the rows used instead, which still gives compiled attention few shapes.
            num_rows = min(num_rows, 1 << (len(rows) - 1).bit_length())
        return build_shared_inputs(
            examples,
            rows,
            self.pad_token_id,
            share_prompt=self.share_prompt,
            length=self.packing_length,
            pad_to_multiple_of=self.shared_pad_to_multiple_of,
            num_rows=num_rows,
            score=score,
            group_prompts=self.group_prompts,
            standard_width=standard_width,
        )


@dataclass
class PrefixSharingCollator(SharedLayoutCollator, DataCollatorForPreference):
    """TRL's preference collator, plus the ``shared_inputs`` of one forward that replaces the standard one.

    Examples must already fit ``max_length``: the trainer truncates them when it prepares the dataset, the same way on
    every path.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["shared_inputs"] = self.shared_inputs(examples, "next_token")
        return batch


@dataclass
class PrefixRewardCollator(SharedLayoutCollator, RewardDataCollatorForPreference):
    """TRL's reward-model collator, plus the ``shared_inputs`` of one forward: each pair split at the common token
    prefix of its chosen and rejected sequences, or of its group's (:func:`split_common_prefixes`), scored at each
    sequence's last token."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["shared_inputs"] = self.shared_inputs(split_common_prefixes(examples), "last_token")
        return batch


def attention_windows(config: PretrainedConfig) -> dict[str, int | None]:
    """The attention kinds a model's layers use, each with its sliding window (``None`` for full attention).

    Raises ``ValueError`` for attention that a mask cannot express under the model's backend: layer kinds other than
    full and sliding-window attention, and attention-logit soft-capping (Gemma 2) under sdpa, which has no way to
    apply it. transformers refuses sdpa for Gemma 2 at load time and raises in the forward when a soft-cap reaches
    sdpa anyway (a forced ``config._attn_implementation``, or Gemma 3 given a soft-cap); this says so up front,
    naming the model type and what to use instead.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if softcap is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        raise ValueError(
            f"Model type '{config.model_type}' soft-caps its attention logits (attn_logit_softcapping={softcap}), "
            "which sdpa cannot apply. Use --attn_implementation eager, or flex_attention on GPU (block-sparse, and "
            "it applies the soft-cap)."
        )
    sliding_window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if not layer_types:
        kind = "full_attention" if sliding_window is None else "sliding_attention"
        return {kind: sliding_window}
    windows: dict[str, int | None] = {}
    for kind in dict.fromkeys(layer_types):
        if kind == "full_attention":
            windows[kind] = None
        elif kind == "sliding_attention":
            windows[kind] = sliding_window
        else:
            raise ValueError(
                f"Model type '{config.model_type}' has '{kind}' layers, whose mask prefix sharing cannot build. "
                "Train it without --prefix_sharing."
            )
    return windows


# `layer_types` kinds that a mask governs, and kinds that mix no tokens at all (per-token feed-forward layers).
ATTENTION_LAYER_KINDS = ("full_attention", "sliding_attention")
TOKENWISE_LAYER_KINDS = ("moe", "mlp")


def unmasked_token_mixers(model: torch.nn.Module) -> list[str]:
    """The kinds of layer in ``model`` that mix tokens outside attention, where no mask reaches: convolutions (LFM2),
    state-space layers (Mamba, NemotronH), linear attention (Qwen3-Next); also attention kinds other than full and
    sliding-window. Empty for a model whose every token mixer is full or sliding-window attention.

    Read from the config's ``layer_types`` (transformers lists Mamba, Jamba, NemotronH and Qwen3-Next layers as
    ``linear_attention``). A config that lists no kinds (LFM2-MoE's) is read from the causal ``nn.Conv1d`` that
    convolution and state-space mixers carry, named by the module holding it.
    """
    text_config = model.config.get_text_config()
    known = ATTENTION_LAYER_KINDS + TOKENWISE_LAYER_KINDS
    kinds = [kind for kind in dict.fromkeys(getattr(text_config, "layer_types", None) or []) if kind not in known]
    if kinds:
        return kinds
    holders = (module for module in model.modules() if any(isinstance(c, torch.nn.Conv1d) for c in module.children()))
    return sorted({type(module).__name__ for module in holders})


def _allowed(
    visible_from: torch.Tensor,
    subtree_end: torch.Tensor,
    position: torch.Tensor,
    window: int | torch.Tensor | None,
    batch,
    query,
    key,
) -> torch.Tensor:
    # A key is seen by the span of the row that starts where it becomes visible (itself, or the start of the
    # bidirectional block it lies in) and ends at its subtree's end: a prompt token by the rest of its document, a
    # response token by the rest of its own response, an image token of a bidirectional model also by its image's
    # earlier tokens.
    allowed = (visible_from[batch, key] <= query) & (query < subtree_end[batch, key])
    if window is not None:
        # Subtract on the query side only, so a dense mask never holds an (L, L) integer tensor. The window cuts
        # bidirectional blocks too, as Gemma 3's sliding layers do (AND of the window and OR(causal, image block)).
        allowed = allowed & (position[batch, key] > position[batch, query] - window)
    return allowed


def dense_mask(shared: dict[str, torch.Tensor], window: int | None = None) -> torch.Tensor:
    """``(rows, 1, length, length)`` boolean mask, True where the query (dim 2) attends to the key (dim 3)."""
    rows, length = shared["input_ids"].shape
    device = shared["input_ids"].device
    batch = torch.arange(rows, device=device)[:, None, None]
    query = torch.arange(length, device=device)[None, :, None]
    key = torch.arange(length, device=device)[None, None, :]
    tokens = shared["visible_from"], shared["subtree_end"], shared["position_ids"]
    return _allowed(*tokens, window, batch, query, key)[:, None]


# Full attention, for FlexAttention, as a window no position difference reaches: every layer kind of a model then
# runs the same mask_mod code on tensors of the same shapes, so they share one compiled kernel instead of one each.
FULL_ATTENTION_WINDOW = 2**40
# FlexAttention's default sparse block (create_block_mask's), in tokens along queries and keys.
BLOCK = 128
# Blocks whose window test is evaluated token by token at once (each 128 x 128): bounds the builder's memory.
BLOCKS_PER_CHUNK = 256


def _mask_mod(visible_from: torch.Tensor, subtree_end: torch.Tensor, position: torch.Tensor, window: torch.Tensor):
    # The closure holds these four tensors and nothing else: dynamo guards on what a mask_mod captures, so a captured
    # container that changes later (a dict gaining a key) would recompile flex_attention on every forward.
    def mask_mod(batch, head, query, key):
        return _allowed(visible_from, subtree_end, position, window, batch, query, key)

    return mask_mod


def _per_block(values: torch.Tensor, fill: int, reduce: str) -> torch.Tensor:
    """``(rows, length)`` -> ``(rows, blocks)``: the min or max of each block's tokens; ``fill`` pads the last."""
    rows, length = values.shape
    padded = torch.nn.functional.pad(values, (0, round_up(length, BLOCK) - length), value=fill)
    blocks = padded.view(rows, -1, BLOCK)
    return blocks.amin(-1) if reduce == "min" else blocks.amax(-1)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(rows, q_blocks, kv_blocks)`` block selection as BlockMask's counts and indices (selected blocks first,
    in increasing order), with the head dimension of one."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), indices[:, None].contiguous()


def _evaluated_counts(
    shared: dict[str, torch.Tensor], window: int | None, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``blocks`` (``(n, 3)``: row, query block, key block), whether any and whether every query-key pair of
    the block is allowed, evaluated token by token, a bounded number of blocks at a time."""
    tokens = shared["visible_from"], shared["subtree_end"], shared["position_ids"]
    length = tokens[0].shape[1]
    offsets = torch.arange(BLOCK, device=tokens[0].device)
    any_allowed, all_allowed = [], []
    for chunk in blocks.split(BLOCKS_PER_CHUNK):
        batch = chunk[:, 0, None, None]
        query = chunk[:, 1, None, None] * BLOCK + offsets[None, :, None]
        key = chunk[:, 2, None, None] * BLOCK + offsets[None, None, :]
        inside = (query < length) & (key < length)  # create_block_mask pads the last block with masked pairs
        allowed = inside & _allowed(*tokens, window, batch, query.clamp(max=length - 1), key.clamp(max=length - 1))
        any_allowed.append(allowed.flatten(1).any(1))
        all_allowed.append(allowed.flatten(1).all(1))
    return torch.cat(any_allowed), torch.cat(all_allowed)


def _bidirectional_blocks(visible_from: torch.Tensor) -> torch.Tensor:
    """``(rows, q_blocks, kv_blocks)``: block pairs that may both hold tokens of one bidirectional block (an image of
    a model that attends within images both ways), where a key can be seen by an earlier query. Judged by the range
    of block starts each block holds, so it may also flag pairs that do not."""
    index = torch.arange(visible_from.shape[1], device=visible_from.device)
    starts = torch.zeros_like(visible_from, dtype=torch.bool)
    starts[:, :-1] = visible_from[:, 1:] == index[:-1]  # the next token is seen from this one: a block starts
    member = (visible_from < index) | starts
    low = _per_block(torch.where(member, visible_from, 2**62), 2**62, "min")
    high = _per_block(torch.where(member, visible_from, -1), -1, "max")
    return (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])


def block_mask(shared: dict[str, torch.Tensor], window: int | None = None):
    """The same mask as a FlexAttention ``BlockMask``, equal to ``create_block_mask``'s (the same full, partial and
    empty blocks), built from the layout in closed form instead: nothing is compiled, so no length costs a compile
    (``torch.compile(create_block_mask)`` takes minutes at some static lengths, pytorch#182060), and neither the
    ``length x length`` mask nor its block sums are ever materialized.

    Without a window a block is decided by its tokens' extremes. Query block ``j`` and an earlier key block ``i``:
    some pair is allowed iff a key's subtree reaches past the query block's start (``max subtree_end > 128 j``);
    every pair iff every key's subtree covers the whole query block (``min subtree_end >= 128 (j + 1)``, and neither
    block runs past the row's end). The diagonal block always holds allowed pairs (each token sees itself) and never
    only those; later key blocks none. A sliding window (in position space) keeps a full block full when its
    positions are all within it and empties a block when none are. The blocks between, and the blocks that two
    tokens of one bidirectional block may meet in (``visible_from``), are checked token by token.
    Blocks where rejected queries meet chosen keys, and packed documents meet each other, are skipped.
    """
    from torch.nn.attention.flex_attention import BlockMask

    subtree_end, position = shared["subtree_end"], shared["position_ids"]
    rows, length = subtree_end.shape
    device = subtree_end.device
    block = torch.arange(-(-length // BLOCK), device=device)
    query_block, key_block = block[None, :, None], block[None, None, :]
    query_start = query_block * BLOCK
    whole = (block + 1) * BLOCK <= length
    earlier = key_block < query_block
    reaches = _per_block(subtree_end, -1, "max")[:, None, :] > query_start
    covers = _per_block(subtree_end, length + 1, "min")[:, None, :] >= query_start + BLOCK
    some = (earlier & reaches) | (key_block == query_block)
    every = earlier & covers & whole[None, :, None] & whole[None, None, :]
    undecided = _bidirectional_blocks(shared["visible_from"])
    if window is not None:
        # Positions per block: the query block's highest against the key block's lowest, and the reverse.
        key_low = _per_block(position, 2**62, "min")[:, None, :]
        key_high = _per_block(position, -(2**62), "max")[:, None, :]
        query_low = _per_block(position, 2**62, "min")[:, :, None]
        query_high = _per_block(position, -(2**62), "max")[:, :, None]
        inside_window = query_high - key_low < window
        outside_window = query_low - key_high >= window
        undecided = undecided | (some & ~outside_window & ~inside_window)
        some = some & ~outside_window
        every = every & inside_window
    blocks = undecided.nonzero()
    if len(blocks):
        any_allowed, all_allowed = _evaluated_counts(shared, window, blocks)
        rows_at, query_at, key_at = blocks.unbind(1)
        some[rows_at, query_at, key_at] = any_allowed
        every[rows_at, query_at, key_at] = all_allowed
    partial = some & ~every
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(every)
    window_tensor = torch.tensor(FULL_ATTENTION_WINDOW if window is None else window, device=device)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=_mask_mod(shared["visible_from"], subtree_end, position, window_tensor),
        seq_lengths=(length, length),
    )


def attention_mask_for(
    shared: dict[str, torch.Tensor], config: PretrainedConfig, dtype: torch.dtype
) -> torch.Tensor | dict[str, Any]:
    """The mask in the form the model's attention backend takes as given.

    FlexAttention gets a ``BlockMask``; sdpa a boolean mask; eager an additive float mask (eager adds the mask to the
    scores, so a boolean one would be silently wrong). Models whose layers mix full and sliding-window attention get
    one mask per layer kind, keyed as transformers' ``layer_types``.
    """
    backend = config._attn_implementation
    if backend not in MASKABLE_BACKENDS:
        raise ValueError(unsupported_backend_message(backend))
    masks: dict[str, Any] = {}
    for kind, window in attention_windows(config).items():
        if backend == "flex_attention":
            masks[kind] = block_mask(shared, window)
        else:
            allowed = dense_mask(shared, window)
            if backend == "eager":
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                    ~allowed, torch.finfo(dtype).min
                )
            masks[kind] = allowed
    return next(iter(masks.values())) if len(masks) == 1 else masks


def unsupported_backend_message(backend: str | None) -> str:
    return (
        f"attn_implementation='{backend}' cannot take the prefix-sharing attention mask: it only supports plain "
        "causal or padding masks. Use --attn_implementation flex_attention on GPU (block-sparse, fastest) or sdpa "
        "(any device), or train without --prefix_sharing."
    )
