"""Layouts and attention masks for prefix-shared (and packed) DPO batches.

Standard DPO runs every prompt twice, once before the chosen and once before the rejected response. Prefix sharing
runs it once, as one sequence ``prompt | chosen | rejected``, under a mask where the rejected tokens do not see the
chosen ones and their positions restart after the prompt::

    tokens     p0 p1 p2 c0 c1 r0 r1 r2          query \\ key  p0 p1 p2 c0 c1 r0 r1 r2
    positions   0  1  2  3  4  3  4  5              p0        x
    branch      0  0  0  1  1  2  2  2              p1        x  x
                                                    p2        x  x  x
    next-token log-probs are read at:               c0        x  x  x  x
      c0 <- p2   c1 <- c0                           c1        x  x  x  x  x
      r0 <- p2   r1 <- r0   r2 <- r1                r0        x  x  x  .  .  x
                                                    r1        x  x  x  .  .  x  x
                                                    r2        x  x  x  .  .  x  x  x

Every token then sees exactly what it sees in the standard layout, at the same position, so the log-probabilities
(and their gradients) are the standard ones. Packing puts several examples in one row, each its own document
(``sequence_ids``); without prefix sharing an example is two documents, ``prompt+chosen`` and ``prompt+rejected``.

The collator emits TRL's own standard batch (``input_ids``, ``attention_mask``, ``completion_mask`` laid out as
``[chosen rows; rejected rows]``) so that TRL's loss and metrics run unchanged, plus ``shared_inputs``: the tensors of
the single forward that replaces the standard one, and ``score_index``, the flat position in that forward whose
hidden state predicts each standard completion token (in row-major order of the standard completion mask).

The masks themselves are built on the device, in the forward, from ``sequence_ids``/``branch_ids``/``position_ids``:
the collator may run in dataloader workers, and a ``BlockMask`` (which holds a closure) cannot be pickled.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference

from packing import next_fit

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PADDING_SEQUENCE = -1
# Attention backends that take an arbitrary mask through transformers' attention interface.
MASKABLE_BACKENDS = ("flex_attention", "sdpa", "eager")


def round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def shared_sequence_length(example: dict[str, Sequence[int]], share_prompt: bool = True) -> int:
    """Tokens one example takes in the single forward: ``P + C + R`` shared, ``2P + C + R`` otherwise."""
    prompt, chosen, rejected = len(example["prompt_ids"]), len(example["chosen_ids"]), len(example["rejected_ids"])
    return prompt + chosen + rejected + (0 if share_prompt else prompt)


def build_shared_inputs(
    rows: list[list[dict[str, Sequence[int]]]],
    pad_token_id: int,
    share_prompt: bool = True,
    length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Lays out ``rows`` (each a list of tokenized examples) for one forward.

    Returns ``input_ids``, ``position_ids``, ``sequence_ids`` (document index in its row, -1 for padding) and
    ``branch_ids`` (0 prompt, 1 chosen, 2 rejected), all ``(num_rows, length)``, and ``score_index``: for every
    completion token, chosen ones of all examples first then rejected ones, the flat index of the hidden state that
    predicts it. Examples are numbered across rows in order, matching TRL's ``[chosen rows; rejected rows]`` batch.

    >>> shared = build_shared_inputs([[{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [3, 4]}]], 0)
    >>> shared["position_ids"].tolist(), shared["score_index"].tolist()
    ([[0, 1, 2, 3, 4, 3, 4]], [2, 3, 2, 5])
    """
    natural = max(sum(shared_sequence_length(e, share_prompt) for e in row) for row in rows)
    if length is None:
        length = round_up(natural, pad_to_multiple_of)
    elif natural > length:
        raise ValueError(f"A row needs {natural} tokens but the layout length is {length}.")

    input_ids, position_ids, sequence_ids, branch_ids = [], [], [], []
    chosen_index: list[int] = []
    rejected_index: list[int] = []
    for row_number, row in enumerate(rows):
        ids: list[int] = []
        positions: list[int] = []
        sequences: list[int] = []
        branches: list[int] = []
        offset = row_number * length
        document = 0
        for example in row:
            prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
            p, c, r = len(prompt), len(chosen), len(rejected)
            start = len(ids)
            if share_prompt:
                ids += [*prompt, *chosen, *rejected]
                positions += [*range(p + c), *range(p, p + r)]
                sequences += [document] * (p + c + r)
                branches += [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
                document += 1
                # The first rejected token is predicted by the last prompt token, like the first chosen one.
                chosen_index += range(offset + start + p - 1, offset + start + p + c - 1)
                rejected_index += [
                    offset + start + p - 1,
                    *range(offset + start + p + c, offset + start + p + c + r - 1),
                ]
            else:
                ids += [*prompt, *chosen, *prompt, *rejected]
                positions += [*range(p + c), *range(p + r)]
                sequences += [document] * (p + c) + [document + 1] * (p + r)
                branches += [PROMPT] * (2 * p + c + r)
                document += 2
                chosen_index += range(offset + start + p - 1, offset + start + p + c - 1)
                rejected_start = start + p + c
                rejected_index += range(offset + rejected_start + p - 1, offset + rejected_start + p + r - 1)
        padding = length - len(ids)
        input_ids.append(ids + [pad_token_id] * padding)
        # Padding continues the positions so that no position exceeds the model's range more than a real token does.
        position_ids.append(positions + list(range(padding)))
        sequence_ids.append(sequences + [PADDING_SEQUENCE] * padding)
        branch_ids.append(branches + [PROMPT] * padding)

    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "sequence_ids": torch.tensor(sequence_ids, dtype=torch.long),
        "branch_ids": torch.tensor(branch_ids, dtype=torch.long),
        "score_index": torch.tensor(chosen_index + rejected_index, dtype=torch.long),
    }


@dataclass
class PrefixSharingCollator(DataCollatorForPreference):
    """TRL's preference collator, plus the ``shared_inputs`` of one forward that replaces the standard one.

    Without ``packing_length`` each example is one row, padded to a multiple of ``shared_pad_to_multiple_of``
    (FlexAttention compiles once per shape, so padding to a multiple of 128 bounds the number of compilations). With
    it, the examples are packed in order into rows of exactly ``packing_length`` tokens, a new row starting when the
    next example does not fit: the packed batch sampler hands them over row by row. ``share_prompt=False`` packs
    ``prompt+chosen`` and ``prompt+rejected`` as two documents (plain DPO packing). Examples must already fit
    ``max_length``: the trainer truncates them when it prepares the dataset, the same way on every path.
    """

    shared_pad_to_multiple_of: int | None = None
    packing_length: int | None = None
    share_prompt: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if self.packing_length is None:
            rows = [[example] for example in examples]
        else:
            lengths = [shared_sequence_length(example, self.share_prompt) for example in examples]
            rows = [[examples[i] for i in row] for row in next_fit(lengths, self.packing_length)]
        batch["shared_inputs"] = build_shared_inputs(
            rows,
            self.pad_token_id,
            share_prompt=self.share_prompt,
            length=self.packing_length,
            pad_to_multiple_of=self.shared_pad_to_multiple_of,
        )
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


def _allowed(shared: dict[str, torch.Tensor], batch, query, key, window: int | None) -> torch.Tensor:
    sequence, branch, position = shared["sequence_ids"], shared["branch_ids"], shared["position_ids"]
    same_document = sequence[batch, query] == sequence[batch, key]
    # Keys from the prompt are seen by both branches; chosen and rejected keys only by their own branch.
    same_branch = (branch[batch, key] == PROMPT) | (branch[batch, key] == branch[batch, query])
    allowed = same_document & (key <= query) & same_branch
    if window is not None:
        # Subtract on the query side only, so a dense mask never holds an (L, L) integer tensor.
        allowed = allowed & (position[batch, key] > position[batch, query] - window)
    return allowed


def dense_mask(shared: dict[str, torch.Tensor], window: int | None = None) -> torch.Tensor:
    """``(rows, 1, length, length)`` boolean mask, True where the query (dim 2) attends to the key (dim 3)."""
    rows, length = shared["input_ids"].shape
    device = shared["input_ids"].device
    batch = torch.arange(rows, device=device)[:, None, None]
    query = torch.arange(length, device=device)[None, :, None]
    key = torch.arange(length, device=device)[None, None, :]
    return _allowed(shared, batch, query, key, window)[:, None]


def block_mask(shared: dict[str, torch.Tensor], window: int | None = None):
    """The same mask as a FlexAttention ``BlockMask``: blocks where rejected queries meet chosen keys are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = shared["input_ids"].shape
    device = shared["input_ids"].device

    def mask_mod(batch, head, query, key):
        return _allowed(shared, batch, query, key, window)

    return create_block_mask(mask_mod, rows, None, length, length, device=device, _compile=device.type == "cuda")


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
