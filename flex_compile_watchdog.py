"""Keeps count of FlexAttention's compilations, and warns when it leaves the compiled path.

transformers runs ``flex_attention`` through ``torch.compile``, and the prefix-sharing mask is built by a compiled
``create_block_mask``. Dynamo compiles a new variant of a function whenever one of its guards fails: a new shape (the
first change of a dimension makes it dynamic), the grad mode (the policy's forward against the reference's no-grad
one), a value the mask captures. Past ``torch._dynamo.config.recompile_limit`` variants of one function (8 by
default), dynamo stops compiling it and runs it as plain Python from then on. flex_attention then materializes the
whole score matrix: 10-40x slower, and tens of GiB on long rows. By default nothing says so.

The layout is built to stay well inside the limit (masks capture id tensors only, packed batches have one shape,
unpacked lengths are multiples of 128). This module checks that it does: :func:`compiled_variants` counts the
variants dynamo holds for each watched function, :class:`FlexCompileWatchdog` warns once when a count passes
:data:`COMPILE_BUDGET`, and a listener on dynamo's log warns once, naming the function and dynamo's reason, when a
watched function hits the recompile limit and falls back.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from transformers import TrainerCallback

# Variants a whole run may compile per watched function. A run compiles each function for the grad mode of the
# policy and the no-grad mode of the reference and evaluation, each first for its first shape and once more with
# dynamic lengths when unpacked lengths vary, and once more with dynamic rows where evaluation uses another batch size.
COMPILE_BUDGET = 6

FALLBACK_COST = (
    "flex_attention now runs uncompiled for the rest of the process: it materializes the full (rows x heads x length "
    "x length) score matrix, typically 10-40x slower and tens of GiB more memory on long rows."
)


def watched_functions() -> dict[str, Callable]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return {"flex_attention": flex_attention, "create_block_mask": create_block_mask}


def compiled_variants() -> dict[str, int]:
    """The compiled variants dynamo holds for each watched function (none after ``torch._dynamo.reset()``)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in watched_functions().items()}


class _WarnOnce:
    def __init__(self) -> None:
        self.said: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


_warn_once = _WarnOnce()


def forget_warnings() -> None:
    """Lets every warning be given once more (after ``torch._dynamo.reset()``, when counting starts over)."""
    _warn_once.said.clear()


class _RecompileLimitListener(logging.Handler):
    """Reads dynamo's 'hit config.recompile_limit' message, which is the only sign that a function fell back."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." not in message:
            return
        for name in watched_functions():
            if f"'{name}'" in message:
                reason = next((line.strip() for line in message.splitlines() if "last reason" in line), "")
                _warn_once(
                    f"fallback:{name}",
                    f"torch.compile gave up on {name}: dynamo hit its recompile limit "
                    f"(torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit}); {reason}. "
                    f"{FALLBACK_COST} Counts so far: {compiled_variants()}. Run with TORCH_LOGS=recompiles to see "
                    "every reason.",
                )


_listener = _RecompileLimitListener(level=logging.WARNING)


def listen_for_fallbacks() -> None:
    """Attaches the recompile-limit listener to dynamo's logger (once per process)."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _listener not in logger.handlers:
        logger.addHandler(_listener)


def check_budget() -> dict[str, int]:
    """Warns once per function whose compiled variants passed :data:`COMPILE_BUDGET`; returns the counts."""
    counts = compiled_variants()
    limit = torch._dynamo.config.recompile_limit
    for name, count in counts.items():
        if count > COMPILE_BUDGET:
            _warn_once(
                f"budget:{name}",
                f"{name} has been compiled {count} times in this process, past the budget of {COMPILE_BUDGET} "
                f"variants; at {limit} dynamo stops compiling it and {FALLBACK_COST} Each variant also costs tens of "
                "seconds of compilation. Run with TORCH_LOGS=recompiles to see what changes between calls.",
            )
    return counts


class FlexCompileWatchdog(TrainerCallback):
    """Checks the compile budget after every step and evaluation, and keeps the latest counts for the summary."""

    def __init__(self) -> None:
        listen_for_fallbacks()
        self.counts = compiled_variants()

    def on_step_end(self, args, state, control, **kwargs):
        self.counts = check_budget()

    def on_evaluate(self, args, state, control, **kwargs):
        self.counts = check_budget()
