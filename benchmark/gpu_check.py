"""Every GPU check of the project in one command, in one report.

    python benchmark/gpu_check.py            # one H100/H200, one 10-minute call (--budget-seconds, default 560)
    python benchmark/gpu_check.py --smoke    # the same pipeline on CPU, tiny model, sdpa, under a minute (CI)

In this order:
0. the first packed step: prefix sharing + packing on the benchmark's first shape and model, timed before anything
   else compiles (on the H200 of 2026-11-26 it took over two minutes, cause not established). Past
   ``--first-step-limit`` seconds every thread's stack is written to ``<output>/<report>-first-step-stacks.txt``,
   again every ``--first-step-limit`` seconds while the step lasts;
1. exactness: float32, FlexAttention forward + backward (sdpa/eager on CPU) of PrefixDPOTrainer against
   ``trl.DPOTrainer`` on the same batch: loss, per-sequence log-probs, every gradient and TRL's metrics, for Llama,
   Mistral with a sliding window, Qwen2 with mixed layer kinds, Gemma 2 (soft-capping), ipo+sft, packed rows with and
   without sharing, precomputed reference log-probs, and groups (several pairs per prompt) unpacked and packed; and
   PrefixRewardTrainer against ``trl.RewardTrainer`` on groups;
2. bf16 agreement: prefix sharing in bf16 against TRL in bf16, beside TRL bf16 against TRL float32;
3. compile counts: flex_attention and create_block_mask variants over 20 training steps per mode (unpacked with
   mixed layer kinds, a reference model, evaluation and gradient checkpointing; packed with precomputed reference
   log-probs and evaluation; packed without sharing), each from a fresh dynamo;
4. the quick benchmark: ``throughput.py`` on the Capybara, MetaMath and TLDR shapes, the five configurations of the
   paper's table, a Llama-3.2-1B-sized model in bf16, each configuration isolated (its compiled variants, warm-up
   seconds and peak memory recorded); after the first shape, the prefix-tree case: the ``system-prompt`` shape (tool
   definitions on every prompt), prefix sharing (a row's sequences as one tree) against pairwise prefix sharing
   (each pair alone, the paper's layout) and TRL's path, in the same run and on the same model.

Each phase has a share of the budget; the report (markdown and JSON, with the date, the device and the command) is
rewritten after every phase and every benchmark shape, so a run cut short keeps what it measured. On the H200 of
2026-11-26 phases 1-2 took 100 s and compiling cost 45-75 s per FlexAttention configuration, so one call holds the
checks and about one shape; ``python benchmark/throughput.py --shapes metamath tldr ...`` (the same flags) measures
the others in a second call. Inductor's and Triton's compile caches live in ``<output>/compile-cache`` (unless
TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR is set): a second run given the same folder loads the kernels the first
compiled, and the report says whether the cache was cold or warm.

The smoke run proves the pipeline, not the numbers (the test suite checks exactness on CPU): every phase runs, without
time limits, on the fewest cases that take each of its paths, and writes its report.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):  # the project's modules, and the exactness harness the test suite uses
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import throughput  # noqa: E402
from report import machine_description, markdown_table, median_speedup  # noqa: E402
from shapes import SHAPES, TREE_SHAPES  # noqa: E402
from timing import CONFIGS, ShapeRun, TreeShapeRun, run_epoch  # noqa: E402

# The paper's speedups on Capybara (8xH100, Mistral-7B) that the GPU run must reach.
PAPER_OVER_FLEX = 1.54
PAPER_PACKED_OVER_PACKING = 1.36
COMPILE_STEPS = 20
# The smoke run's training steps per compile mode: the second step is the first that reuses what the first compiled.
SMOKE_COMPILE_STEPS = 2
# The smoke run's exactness cases: one per path of `check_exactness` (unpacked, packed, reward model).
SMOKE_CASES = ("llama", "packed, prefix sharing", "reward model, groups", "vision: gemma 3, packed")
# The smoke run's conversations: a tenth of the default lengths, so that its CPU forwards take seconds, not minutes.
SHORT = {"prompt_words": (10, 60), "response_words": (3, 20), "turns": (1, 2)}
ERROR_KEYS = ("loss", "chosen_logps", "rejected_logps", "rewards", "max_grad")
# The benchmark's prefix-tree case: prefix sharing against pairwise prefix sharing on a tree shape (TRL's path is the
# reference throughput.py's tables need). Unpacked only: each FlexAttention configuration costs a GPU compile.
TREE_SHAPE = "system-prompt"
TREE_CONFIGS = ("baseline", "pairwise", "sharing")


class PhaseTimeout(BaseException):
    """A BaseException, so that the per-case ``except Exception`` of a phase does not swallow it."""


@contextmanager
def time_limit(seconds: float | None):
    """Interrupts the phase (SIGALRM) once its share of the budget is spent; the report keeps what it measured. No
    limit for ``None``."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise PhaseTimeout(f"phase stopped after its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------------------------
# 0. The first packed step, and the compile cache
# ---------------------------------------------------------------------------------------------------------------------


def use_compile_cache(output_dir: Path) -> dict[str, Any]:
    """Points Inductor's and Triton's caches at ``output_dir/compile-cache`` unless the environment already names them,
    before anything compiles, so that a later run given the same folder loads what this one compiled. Returns where
    they are and whether they held anything at the start (``warm``)."""
    caches = {}
    for variable, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        given = variable in os.environ
        path = Path(os.environ.setdefault(variable, str((output_dir / "compile-cache" / name).resolve())))
        files = sum(1 for entry in path.rglob("*") if entry.is_file()) if path.is_dir() else 0
        caches[variable] = {"path": str(path), "files_at_start": files, "from_environment": given}
    return {"warm": any(cache["files_at_start"] for cache in caches.values()), "caches": caches}


@contextmanager
def stacks_after(limit: float, path: Path):
    """While the block runs: past ``limit`` seconds, and every ``limit`` seconds after, appends every other thread's
    stack to ``path``; ``path`` is left only if the block ran that long. The stacks are read by a thread of ours under
    the GIL (faulthandler's watchdog reads them without it, and crashed the process when a dump met a frame that was
    being torn down)."""
    done = threading.Event()
    dumps = 0

    def watch() -> None:
        nonlocal dumps
        with path.open("w") as out:
            while not done.wait(limit):
                dumps += 1
                out.write(f"=== {dumps * limit:g} s\n")
                names = {thread.ident: thread.name for thread in threading.enumerate()}
                for ident, frame in sys._current_frames().items():
                    if ident != threading.get_ident():
                        out.write(f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}\n")
                out.flush()

    watcher = threading.Thread(target=watch, name="stacks_after", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        if not dumps:
            path.unlink()


def check_first_packed_step(bench_args: argparse.Namespace, scratch: Path, stacks: Path, limit: float) -> dict:
    """One training step of prefix sharing + packing on the benchmark's first shape and model, in a fresh dynamo,
    timed from the ``train()`` call (building the optimizer and the first batch included) to the end of the step.
    Past ``limit`` seconds every thread's stack goes to ``stacks``, and again every ``limit`` seconds."""
    import torch

    import flex_compile_watchdog
    from embedded import load_tokenizer

    torch._dynamo.reset()
    flex_compile_watchdog.forget_warnings()
    shape = bench_args.shapes[0]
    trainer = ShapeRun(SHAPES[shape], load_tokenizer(), bench_args, scratch, print).trainer(CONFIGS["sharing+packing"])
    started = time.perf_counter()
    with stacks_after(limit, stacks):
        epoch = run_epoch(trainer, max_steps=1)
    seconds = time.perf_counter() - started
    result = {
        "shape": shape,
        "configuration": "sharing+packing",
        "packing_length": trainer.args.packing_length,
        "seconds": seconds,
        "step_seconds": epoch.step_seconds[0],
        "limit_seconds": limit,
        "stacks": stacks.name if stacks.exists() else None,
        "variants": flex_compile_watchdog.compiled_variants(),
    }
    trainer.accelerator.free_memory()  # the models leave the GPU before the next phase
    return result


# ---------------------------------------------------------------------------------------------------------------------
# 1. Exactness
# ---------------------------------------------------------------------------------------------------------------------


def exactness_cases(flex: bool, smoke: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, make_trainers arguments). TRL runs sdpa (eager where sdpa cannot soft-cap); ours flex on a GPU."""
    ours = "flex_attention" if flex else None
    cases = [
        ("llama", {"ours_attn_implementation": ours}),
        ("mistral, sliding window", {"model_type": "mistral", "model_overrides": {"sliding_window": 24}}),
        (
            "qwen2, mixed layer kinds",
            {
                "model_type": "qwen2",
                "model_overrides": {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
            },
        ),
        ("gemma2, soft-capping", {"model_type": "gemma2", "attn_implementation": "eager"}),
        ("ipo + sft", {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]}),
        ("packed, prefix sharing", {"packed": True}),
        ("packed, no sharing", {"packed": True, "prefix_sharing": False}),
        ("precomputed reference", {"reference": "precompute"}),
        ("groups: 4 responses per prompt, all pairs", {"data": "groups"}),
        ("groups, packed", {"data": "groups", "packed": True}),
        ("reward model, groups", {"data": "groups", "reward": True}),
        # Vision data (tests/test_vision.py's batch): Gemma 3's bidirectional image blocks in the BlockMask, packed;
        # Qwen2-VL's multimodal positions (transformers runs Qwen-VL on sdpa, not flex_attention).
        ("vision: gemma 3, packed", {"vision": "gemma3", "packed": True}),
        ("vision: qwen2-vl", {"vision": "qwen2_vl"}),
    ]
    return [case for case in cases if case[0] in SMOKE_CASES] if smoke else cases


def check_exactness(flex: bool, short: bool, scratch: Path, record: Callable[[dict], None]) -> None:
    import torch
    from dpo_harness import assert_same_step, conversational_rows, make_trainers, relative_error, train_step
    from reward_harness import assert_same_reward_step, make_reward_trainers, reward_rows, reward_step
    from test_groups import grouped_rows
    from test_packing import packing_length_for
    from test_vision import LAYOUTS, make_vision_trainers, vision_rows

    datasets = {"conversational": conversational_rows(6, **(SHORT if short else {})), "groups": grouped_rows(2, 4)}
    for name, case in exactness_cases(flex, short):
        torch._dynamo.reset()  # each case compiles from scratch, so no case's variants count against another's
        case = dict(case)
        case.setdefault("ours_attn_implementation", "flex_attention" if flex else None)
        dataset = datasets[case.pop("data", "conversational")]
        reward = case.pop("reward", False)
        vision = case.pop("vision", None)
        if vision is not None:
            case = {**LAYOUTS["packed" if case.pop("packed", False) else "unpacked"], **case}
            if vision.startswith("qwen"):
                case["ours_attn_implementation"] = None
        elif case.pop("packed", False):
            case["packing_length"] = packing_length_for(dataset, case.get("prefix_sharing", True))
        started = time.perf_counter()
        entry: dict[str, Any] = {"case": name}
        try:
            tmp_path = scratch / name.replace(" ", "_").replace(":", "").replace(",", "")
            if reward:
                trl_trainer, ours = make_reward_trainers(reward_rows(), tmp_path=tmp_path, **case)
                step = reward_step
            elif vision is not None:
                trl_trainer, ours = make_vision_trainers(vision, vision_rows(), **case)
                step = train_step
            else:
                trl_trainer, ours = make_trainers(dataset, tmp_path=tmp_path, **case)
                step = train_step
            entry["ours_attention"] = ours.model.config._attn_implementation
            entry["trl_attention"] = trl_trainer.model.config._attn_implementation
            ours_step, trl_step = step(ours), step(trl_trainer)
            grad_errors = [relative_error(ours_step.grads[k], g) for k, g in trl_step.grads.items()]
            entry.update(loss=relative_error(ours_step.loss, trl_step.loss), max_grad=max(grad_errors))
            if reward:
                entry["rewards"] = relative_error(ours_step.rewards, trl_step.rewards)
                assert_same_reward_step(ours_step, trl_step)
            else:
                entry["chosen_logps"] = relative_error(ours_step.chosen_logps, trl_step.chosen_logps)
                entry["rejected_logps"] = relative_error(ours_step.rejected_logps, trl_step.rejected_logps)
                assert_same_step(ours_step, trl_step)
            entry["passed"] = True
        except Exception as error:  # a failed case is reported, and the other cases still run
            entry.update(passed=False, error=f"{type(error).__name__}: {error}"[:500])
            traceback.print_exc()
        entry["seconds"] = time.perf_counter() - started
        record(entry)


# ---------------------------------------------------------------------------------------------------------------------
# 2. bf16 agreement
# ---------------------------------------------------------------------------------------------------------------------


def check_bf16(flex: bool, short: bool, scratch: Path) -> dict[str, Any]:
    """TRL in float32 is the truth. In bf16, prefix sharing must differ from TRL by no more than TRL's own bf16 run
    differs from TRL's float32 one: the layout adds no error of its own beyond bf16's."""
    import torch
    from dpo_harness import conversational_rows, make_trainers, relative_error, train_step

    torch._dynamo.reset()
    rows = conversational_rows(4, **SHORT) if short else conversational_rows(16)
    trl_trainer, ours = make_trainers(
        rows, ours_attn_implementation="flex_attention" if flex else None, tmp_path=scratch
    )
    truth = train_step(trl_trainer)
    steps = {}
    for name, trainer in (("trl", trl_trainer), ("prefix_sharing", ours)):
        trainer.model.to(torch.bfloat16)
        trainer.ref_model.to(torch.bfloat16)
        steps[name] = train_step(trainer)

    def errors(step, against) -> dict[str, float]:
        def flat(s):
            logps = torch.cat([s.chosen_logps, s.rejected_logps]).float()
            return logps, s.loss.float(), torch.cat([s.grads[k].float().flatten() for k in truth.grads])

        return {
            key: relative_error(value, reference)
            for key, value, reference in zip(("logps", "loss", "grads"), flat(step), flat(against), strict=True)
        }

    own = errors(steps["trl"], truth)
    against_trl = errors(steps["prefix_sharing"], steps["trl"])
    return {
        "ours_attention": ours.model.config._attn_implementation,
        "trl_attention": trl_trainer.model.config._attn_implementation,
        "trl_bf16_error": own,
        "prefix_sharing_bf16_error": errors(steps["prefix_sharing"], truth),
        "prefix_sharing_vs_trl_bf16": against_trl,
        "passed": all(against_trl[key] <= own[key] for key in ("logps", "loss")),
        "examples": len(rows),
    }


# ---------------------------------------------------------------------------------------------------------------------
# 3. Compile counts
# ---------------------------------------------------------------------------------------------------------------------


def compile_modes(steps: int = COMPILE_STEPS) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, model type, PrefixDPOConfig overrides): every forward the trainer runs, ``steps`` steps each, evaluating
    halfway and at the end. TRL's own path and the same layouts on a real model are counted by the benchmark's
    configurations."""
    qwen2_mixed = ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1})
    evaluation = {"eval_strategy": "steps", "eval_steps": max(1, steps // 2), "per_device_eval_batch_size": 3}
    packed = {"enable_packing": True, "packing_length": "auto"}
    return [
        ("unpacked sharing, mixed layer kinds (qwen2): policy, reference, eval, gradient checkpointing", qwen2_mixed, {
            "prefix_sharing": True, "gradient_checkpointing": True, **evaluation,
        }),
        ("packed sharing: precomputed reference, eval", "llama", {
            "prefix_sharing": True, "precompute_ref_log_probs": True, **packed, **evaluation,
        }),
        ("packed, no sharing: policy, reference, gradient checkpointing", "llama", {
            "prefix_sharing": False, "gradient_checkpointing": True, **packed,
        }),
    ]  # fmt: skip


def check_compiles(flex: bool, short: bool, scratch: Path, record: Callable[[dict], None]) -> None:
    import torch
    from dpo_harness import conversational_rows

    import flex_compile_watchdog
    from embedded import load_tokenizer, tiny_model
    from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

    steps = SMOKE_COMPILE_STEPS if short else COMPILE_STEPS
    if short:
        train, evaluation = conversational_rows(8, seed=1, **SHORT), conversational_rows(3, seed=2, **SHORT)
    else:
        train, evaluation = conversational_rows(40, seed=1), conversational_rows(9, seed=2)
    attention = "flex_attention" if flex else "sdpa"
    for name, model, overrides in compile_modes(steps):
        model_type, model_overrides = (model, {}) if isinstance(model, str) else model
        torch._dynamo.reset()
        flex_compile_watchdog.forget_warnings()
        started = time.perf_counter()
        entry: dict[str, Any] = {"mode": name}
        try:
            args = PrefixDPOConfig(
                output_dir=str(scratch / f"compile-{len(name)}"),
                per_device_train_batch_size=2,
                max_steps=steps,
                learning_rate=1e-5,
                bf16=flex,
                report_to="none",
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
                **overrides,
            )
            models = [
                tiny_model(model_type, seed=seed, attn_implementation=attention, **model_overrides) for seed in (0, 1)
            ]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                trainer = PrefixDPOTrainer(
                    model=models[0],
                    ref_model=None if args.precompute_ref_log_probs else models[1],
                    args=args,
                    train_dataset=train,
                    eval_dataset=evaluation if args.eval_strategy != "no" else None,
                    processing_class=load_tokenizer(),
                )
                trainer.train()
            entry.update(
                steps=trainer.state.global_step,
                attention=trainer.model.config._attn_implementation,
                variants=flex_compile_watchdog.compiled_variants(),
                recompile_limit=torch._dynamo.config.recompile_limit,
                watchdog_warnings=[str(w.message) for w in caught if w.category is RuntimeWarning],
            )
            entry["passed"] = (
                entry["steps"] == steps
                and not entry["watchdog_warnings"]
                and max(entry["variants"].values()) < entry["recompile_limit"]
            )
        except Exception as error:
            entry.update(passed=False, error=f"{type(error).__name__}: {error}"[:500])
            traceback.print_exc()
        entry["seconds"] = time.perf_counter() - started
        record(entry)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Quick benchmark
# ---------------------------------------------------------------------------------------------------------------------


def benchmark_argv(smoke: bool, output_dir: Path, tag: str, tree: bool = False) -> list[str]:
    """``throughput.py``'s arguments for the paper's shapes, or (``tree``) for the prefix-tree case: the same model
    and settings on :data:`TREE_SHAPE` with :data:`TREE_CONFIGS`."""
    if smoke:
        # HH-RLHF, the shortest shape: a sixth of Capybara's lengths, whose rows cost a CPU minutes. The tree case's
        # 4 examples (one batch) of about 1.6k tokens, most of them the tool block, take seconds.
        shapes, examples = ["hh-rlhf"], "4" if tree else "8"
        configs = ["baseline", "sharing", "packing", "sharing+packing"]
        setup = ["--model-size", "tiny", "--pool-size", "40", "--warmup-steps", "1"]
    else:
        shapes, examples = ["capybara", "metamath", "tldr"], "48" if tree else "80"
        configs = ["baseline", "baseline-flex", "sharing", "packing", "sharing+packing"]
        setup = ["--model-size", "llama-1b", "--bf16", "--attn-implementation", "flex_attention"]
        setup += ["--packing-factor", "4", "--warmup-steps", "3", "--gradient-checkpointing"]
    if tree:
        shapes, configs = [TREE_SHAPE], list(TREE_CONFIGS)
    setup += ["--shapes", *shapes, "--configs", *configs, "--examples", examples]
    return [*setup, "--isolate", "--repeats", "1", "--output-dir", str(output_dir), "--tag", tag]


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's done criteria: (criterion, what was measured, passed; None where not measured)."""
    rows: list[tuple[str, str, bool | None]] = []
    exactness = report["phases"].get("exactness", {}).get("cases", [])
    rows.append(
        (
            "float32 exactness against trl.DPOTrainer (1e-5)",
            f"{sum(c['passed'] for c in exactness)} of {len(exactness_cases(False, report['smoke']))} cases",
            len(exactness) == len(exactness_cases(False, report["smoke"])) and all(c["passed"] for c in exactness),
        )
    )
    bf16 = report["phases"].get("bf16", {}).get("result")
    measured = "-"
    if bf16 is not None:
        ours, trl = bf16["prefix_sharing_vs_trl_bf16"], bf16["trl_bf16_error"]
        measured = f"log-probs {ours['logps']:.1e} vs {trl['logps']:.1e}, loss {ours['loss']:.1e} vs {trl['loss']:.1e}"
    rows.append(
        (
            "bf16: prefix sharing against TRL bf16 no further than TRL bf16 from TRL float32 (log-probs, loss)",
            measured,
            None if bf16 is None else bf16["passed"],
        )
    )
    # Every compile mode ran its steps without a watchdog warning, and every benchmark configuration stayed quiet.
    modes = report["phases"].get("compiles", {}).get("modes", [])
    benchmark = report["phases"].get("benchmark", {}).get("payload")
    configurations = [c for r in (benchmark or {}).get("results", []) for c in r["compilation"].values()]
    worst = [max(m["variants"].values()) for m in modes if "variants" in m]
    worst += [max(c["variants"].values()) for c in configurations]
    rows.append(
        (
            "no configuration reaches the recompile limit; the watchdog stays quiet",
            f"{len(modes)} of {len(compile_modes())} modes and {len(configurations)} benchmark configurations; most "
            f"variants of one function: {max(worst, default=0)}",
            len(modes) == len(compile_modes())
            and all(m["passed"] for m in modes)
            and not any(c["watchdog_warnings"] for c in configurations),
        )
    )
    capybara = next((r for r in (benchmark or {}).get("results", []) if r["shape"]["key"] == "capybara"), None)
    for label, key, over, target in (
        ("prefix sharing over TRL's flex path, Capybara", "sharing", "baseline-flex", PAPER_OVER_FLEX),
        ("prefix sharing + packing over packing, Capybara", "sharing+packing", "packing", PAPER_PACKED_OVER_PACKING),
    ):
        speedup = median_speedup(capybara, key, over) if capybara else None
        rows.append((f"{label} >= {target}x (paper)", fmt(speedup), None if speedup is None else speedup >= target))
    tree = next((r for r in (benchmark or {}).get("results", []) if r["shape"]["key"] == TREE_SHAPE), None)
    speedup = median_speedup(tree, "sharing", "pairwise") if tree else None
    rows.append(
        (
            "prefix trees over pairwise prefix sharing, tool block on every prompt: faster",
            "-" if tree is None else f"{fmt(speedup)} ({tree_tokens(tree)} tokens computed)",
            None if speedup is None else speedup > 1.0,
        )
    )
    return rows


def tree_tokens(result: dict[str, Any]) -> str:
    """The tokens the tree case's two layouts computed: pairwise / tree."""
    return f"{result['work']['pairwise']['tokens']:,} / {result['work']['sharing']['tokens']:,}"


def yes_no(passed: bool | None, error: str = "") -> str:
    return "-" if passed is None else ("yes" if passed else f"NO {error}".strip())


def render(report: dict[str, Any], path: Path) -> None:
    phases = report["phases"]
    sections = [
        "\n".join(
            [
                f"# GPU check ({report['date']}){' — smoke mode, CPU' if report['smoke'] else ''}",
                "",
                f"- command: `{report['command']}`",
                f"- device: {report['machine']}",
                f"- versions: {report['versions']}",
                f"- wall time: {report.get('elapsed_seconds', 0) / 60:.1f} min"
                + (f" of a {report['budget_seconds'] / 60:.1f}-min budget" if report["budget_seconds"] else ""),
                f"- compile cache: {'warm' if report['compile_cache']['warm'] else 'cold (empty at the start)'}, "
                + ", ".join(
                    f"`{cache['path']}` ({cache['files_at_start']} files at the start)"
                    for cache in report["compile_cache"]["caches"].values()
                ),
            ]
        ),
        markdown_table(["criterion", "measured", "passed"], [[c, m, yes_no(p)] for c, m, p in verdicts(report)]),
    ]
    first = phases.get("first_packed_step", {}).get("result")
    if first is not None:
        over = (
            f"; past the {first['limit_seconds']:g}-s limit: stacks in `{first['stacks']}`" if first["stacks"] else ""
        )
        sections += [
            "## 0. First packed step (prefix sharing + packing, before anything else compiled)",
            f"{first['shape']}, packing length {first['packing_length']}: {first['seconds']:.1f} s from `train()` to "
            f"the end of the step (the step itself {first['step_seconds']:.1f} s), compiled variants "
            f"{first['variants']}, {'warm' if report['compile_cache']['warm'] else 'cold'} compile cache{over}.",
        ]
    if "exactness" in phases:
        rows = [
            [
                case["case"],
                f"{case.get('ours_attention', '-')} / {case.get('trl_attention', '-')}",
                *("-" if case.get(k) is None else f"{case[k]:.1e}" for k in ERROR_KEYS),
                yes_no(case["passed"], case.get("error", "")),
                f"{case['seconds']:.0f}",
            ]
            for case in phases["exactness"].get("cases", [])
        ]
        columns = ["case", "ours / TRL attention", "loss>", "chosen log-probs>", "rejected log-probs>", "rewards>"]
        columns += ["worst gradient>", "passed", "s>"]
        sections += [
            "## 1. Exactness, float32: relative errors against trl.DPOTrainer (tolerance 1e-5)",
            markdown_table(columns, rows),
        ]
    if phases.get("bf16", {}).get("result"):
        bf16 = phases["bf16"]["result"]
        rows = [
            [label, *(f"{bf16[key][k]:.2e}" for k in ("logps", "loss", "grads"))]
            for label, key in (
                (f"TRL bf16 ({bf16['trl_attention']}) against TRL float32", "trl_bf16_error"),
                (f"prefix sharing bf16 ({bf16['ours_attention']}) against TRL float32", "prefix_sharing_bf16_error"),
                ("prefix sharing bf16 against TRL bf16", "prefix_sharing_vs_trl_bf16"),
            )
        ]
        sections += [
            f"## 2. bf16 agreement: relative errors on the same batch ({bf16['examples']} examples)",
            markdown_table(["comparison", "sequence log-probs>", "loss>", "gradients>"], rows),
        ]
    if "compiles" in phases:
        rows = [
            [
                mode["mode"],
                mode.get("attention", "-"),
                str(mode.get("steps", "-")),
                *(str(mode.get("variants", {}).get(name, "-")) for name in ("flex_attention", "create_block_mask")),
                str(len(mode.get("watchdog_warnings", []))),
                yes_no(mode["passed"], mode.get("error", "")),
                f"{mode['seconds']:.0f}",
            ]
            for mode in phases["compiles"].get("modes", [])
        ]
        columns = ["mode", "attention", "steps>", "flex_attention>", "create_block_mask>", "watchdog warnings>"]
        sections += [
            f"## 3. Compiled variants over {SMOKE_COMPILE_STEPS if report['smoke'] else COMPILE_STEPS} training steps "
            "per mode (fresh dynamo each; dynamo's recompile limit is 8)",
            markdown_table([*columns, "passed", "s>"], rows),
        ]
    benchmark = phases.get("benchmark", {})
    if benchmark.get("payload"):
        results = benchmark["payload"]["results"]
        trees = [result for result in results if "trees" in result]
        rows = []
        for result in (result for result in results if "trees" not in result):
            paper = result["shape"]["paper"]
            rows.append(
                [
                    result["shape"]["name"],
                    f"{result['examples']['bound']:.2f}",
                    f"{fmt(median_speedup(result, 'sharing', 'baseline-flex'))} ({paper['unpacked'][1]:.2f})",
                    fmt(median_speedup(result, "sharing", "baseline")),
                    f"{fmt(median_speedup(result, 'sharing+packing', 'packing'))} ({paper['packed'][1]:.2f})",
                    f"{max(c['warmup_seconds'] for c in result['compilation'].values()):.0f}",
                ]
            )
        columns = ["shape", "token bound>", "sharing / TRL flex (paper)>", "sharing / TRL sdpa>"]
        columns += ["sharing+packing / packing (paper)>", "slowest warm-up, s>"]
        sections += [
            "## 4. Quick benchmark",
            f"`{benchmark['command']}`; every table is in `{benchmark['tag']}.md`.",
            markdown_table(columns, rows),
        ]
        if trees:
            rows = [
                [
                    result["shape"]["name"],
                    tree_tokens(result),
                    fmt(median_speedup(result, "sharing", "pairwise")),
                    fmt(median_speedup(result, "pairwise", "baseline")),
                    fmt(median_speedup(result, "sharing", "baseline")),
                ]
                for result in trees
            ]
            columns = ["prefix-tree shape", "tokens computed: pairwise / tree>", "tree / pairwise>"]
            columns += ["pairwise / TRL sdpa>", "tree / TRL sdpa>"]
            sections += [f"Prefix trees, unpacked: `{benchmark['tree_command']}`.", markdown_table(columns, rows)]
    sections += [
        f"Phase {name} stopped: {phase['error']}"
        + (f" (stacks in `{phase['stacks']}`)" if phase.get("stacks") else "")
        for name, phase in phases.items()
        if phase.get("error")
    ]
    path.write_text("\n\n".join(sections) + "\n")


def versions() -> str:
    import torch
    import transformers
    import trl

    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, sdpa: the same pipeline in a minute")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmark" / "results")
    parser.add_argument("--budget-seconds", type=float, default=None, help="default: 560 on GPU, none in smoke mode")
    parser.add_argument(
        "--first-step-limit",
        type=float,
        default=60.0,
        help="seconds after which the first packed step's stacks are written, and again every as many seconds",
    )
    args = parser.parse_args(argv)
    if args.first_step_limit <= 0:
        parser.error("--first-step-limit must be a positive number of seconds")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    compile_cache = use_compile_cache(args.output_dir)  # before torch is imported: nothing has compiled yet
    throughput.quiet()
    import torch

    # The trainers' modules (trl, transformers' Trainer: seconds to load) load before any phase's time limit: a limit
    # that stopped a phase in the middle of an import would leave them half-loaded for every later phase.
    import prefix_dpo_trainer  # noqa: F401

    if args.smoke:
        # One thread, as throughput.py's default: on a shared machine a multi-threaded op waits for its slowest thread
        # (a packed step took 20 times longer with 2 threads on 2 busy cores).
        torch.set_num_threads(1)
    flex = torch.cuda.is_available() and not args.smoke
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --smoke for the CPU version of these checks.")
    if flex:
        # float32 means float32: TF32 matmuls would put 1e-3 errors into the exactness comparison.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    # The smoke run has no budget: on a loaded machine a phase takes longer, and it is the pipeline that is checked.
    budget = args.budget_seconds or (None if args.smoke else 560.0)
    # Shares of the budget; the benchmark gets what the checks before it left.
    shares = {"first_packed_step": 0.2, "exactness": 0.25, "bf16": 0.07, "compiles": 0.2}
    stem = "gpu-check-smoke" if args.smoke else "gpu-check"
    command = " ".join(["python", "benchmark/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "command": command,
        "machine": machine_description(),
        "versions": versions(),
        "smoke": args.smoke,
        "budget_seconds": budget,
        "compile_cache": compile_cache,
        "phases": {},
    }
    started = time.perf_counter()

    def save() -> None:
        report["elapsed_seconds"] = time.perf_counter() - started
        (args.output_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        render(report, args.output_dir / f"{stem}.md")

    def run_phase(name: str, seconds: float | None, body: Callable[[dict], None]) -> None:
        phase: dict[str, Any] = {}
        report["phases"][name] = phase
        print(f"\n=== {name}" + ("" if seconds is None else f" ({seconds:.0f} s at most)"), flush=True)
        # What is alive now (the libraries above all) stays: kept out of the full collections that accelerate runs at
        # every train() call, which take half a second with it. Frozen objects are still freed when unreferenced.
        gc.collect()
        gc.freeze()
        phase_started = time.perf_counter()
        try:
            with time_limit(seconds):
                body(phase)
        except (Exception, PhaseTimeout) as error:
            phase["error"] = f"{type(error).__name__}: {error}"[:500]
            traceback.print_exc()
        phase["seconds"] = time.perf_counter() - phase_started
        save()

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch_dir:
        scratch = Path(scratch_dir)
        tag = "gpu-throughput-smoke" if args.smoke else "gpu-throughput"
        bench_argv = benchmark_argv(args.smoke, args.output_dir, tag)
        bench_args = throughput.parse_args(bench_argv)
        tree_argv = benchmark_argv(args.smoke, args.output_dir, tag, tree=True)
        tree_args = throughput.parse_args(tree_argv)

        def first_packed_step(phase: dict) -> None:
            stacks = args.output_dir / f"{stem}-first-step-stacks.txt"
            try:
                phase["result"] = check_first_packed_step(bench_args, scratch, stacks, args.first_step_limit)
                print(phase["result"], flush=True)
            finally:  # also when the budget stopped the step: the stacks say where it was
                phase["stacks"] = stacks.name if stacks.exists() else None

        def exactness(phase: dict) -> None:
            phase["cases"] = []
            check_exactness(
                flex, args.smoke, scratch, lambda entry: (phase["cases"].append(entry), print(entry, flush=True))
            )

        def bf16(phase: dict) -> None:
            phase["result"] = check_bf16(flex, args.smoke, scratch / "bf16")
            print(phase["result"], flush=True)

        def compiles(phase: dict) -> None:
            phase["modes"] = []
            check_compiles(
                flex, args.smoke, scratch, lambda entry: (phase["modes"].append(entry), print(entry, flush=True))
            )

        def benchmark(phase: dict) -> None:
            from embedded import load_tokenizer

            tokenizer = load_tokenizer()
            dims = throughput.model_dims(bench_args, len(tokenizer))
            phase.update(
                tag=tag,
                command=f"python benchmark/throughput.py {' '.join(bench_argv)}",
                tree_command=f"python benchmark/throughput.py {' '.join(tree_argv)}",
            )
            bench_started = time.perf_counter()
            results: list[dict[str, Any]] = []
            cases = [(bench_args, ShapeRun, SHAPES[key]) for key in bench_args.shapes]
            # The tree case second: one call's budget holds about one paper shape, whose speedups the verdicts read.
            cases.insert(1, (tree_args, TreeShapeRun, TREE_SHAPES[TREE_SHAPE]))
            for case_args, run_class, shape in cases:
                shape_run = run_class(shape, tokenizer, case_args, scratch, print)
                try:
                    shape_run.run([CONFIGS[c] for c in case_args.configs], case_args.warmup_steps)
                finally:  # a shape cut short by the budget still reports the configurations it finished
                    if shape_run.runs:
                        results.append(shape_run.result())
                    elapsed = time.perf_counter() - bench_started
                    payload = throughput.make_payload(bench_args, dims, phase["command"], results, elapsed)
                    phase["payload"] = payload
                    (args.output_dir / f"{tag}.json").write_text(json.dumps(payload))
                    if results:
                        throughput.render(payload, args.output_dir / tag)
                    save()
                slowest = max(r["wall_seconds"] for r in results)
                out_of_budget = budget is not None and time.perf_counter() + slowest > started + budget
                if len(results) < len(cases) and out_of_budget:
                    phase["error"] = f"stopped after {len(results)} shape(s): the next would not fit the budget"
                    break

        checks = {"first_packed_step": first_packed_step, "exactness": exactness, "bf16": bf16, "compiles": compiles}
        for name, body in checks.items():
            run_phase(name, None if budget is None else shares[name] * budget, body)
        run_phase("benchmark", None if budget is None else started + budget - time.perf_counter(), benchmark)
    save()
    print(f"\nwrote {args.output_dir / stem}.md and .json")
    print((args.output_dir / f"{stem}.md").read_text())
    # Exit status: the correctness checks (exactness, bf16, compiles); speedups are measurements, reported above.
    failed = [criterion for criterion, _, passed in verdicts(report)[:3] if not passed]
    if failed:
        raise SystemExit(f"FAILED: {failed}")


if __name__ == "__main__":
    main()
