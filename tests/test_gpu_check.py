"""`benchmark/gpu_check.py --smoke`: the GPU checks' pipeline on CPU (tiny model, sdpa), as CI runs it."""

import json
import os
import sys
from pathlib import Path

from commands import run_command

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "benchmark"))  # last: its modules shadow nothing

import gpu_check  # noqa: E402

# Alone on 2 cores the smoke run takes about 20 s; a hang, not a slow machine, should end it.
SMOKE_TIMEOUT = 900
# Below what any train() call takes (building the optimizer alone takes longer): the smoke run's first packed step is
# past it, and its stacks are written.
FIRST_STEP_LIMIT = "0.05"


def test_gpu_check_smoke_runs_every_phase(tmp_path):
    command = [sys.executable, "benchmark/gpu_check.py", "--smoke", "--output-dir", str(tmp_path)]
    command += ["--first-step-limit", FIRST_STEP_LIMIT]
    # Without the caches' variables, which inductor sets in this process once it has compiled anything: the run then
    # keeps its caches in its output folder, new, so cold.
    env = {
        key: value for key, value in os.environ.items() if key not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run_command(command, what="`gpu_check.py --smoke`", timeout=SMOKE_TIMEOUT, cwd=ROOT, env=env).check()
    report = json.loads((tmp_path / "gpu-check-smoke.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["first_packed_step", "exactness", "bf16", "compiles", "benchmark"]
    assert not [phase["error"] for phase in phases.values() if phase.get("error")]
    first = phases["first_packed_step"]["result"]
    assert first["configuration"] == "sharing+packing" and first["seconds"] > float(FIRST_STEP_LIMIT)
    assert "check_first_packed_step" in (tmp_path / first["stacks"]).read_text()
    assert not report["compile_cache"]["warm"]
    for cache in report["compile_cache"]["caches"].values():
        assert Path(cache["path"]).is_relative_to(tmp_path / "compile-cache") and not cache["from_environment"]
    cases = phases["exactness"]["cases"]
    assert [case["case"] for case in cases] == list(gpu_check.SMOKE_CASES)
    assert all(case["passed"] for case in cases), cases
    assert phases["bf16"]["result"]["passed"]
    modes = phases["compiles"]["modes"]
    assert len(modes) == 3 and all(mode["passed"] and mode["steps"] == gpu_check.SMOKE_COMPILE_STEPS for mode in modes)
    paper, tree = phases["benchmark"]["payload"]["results"]
    assert set(paper["runs"]) == {"baseline", "sharing", "packing", "sharing+packing"}
    # The prefix-tree case, timed against pairwise prefix sharing: the tree computes fewer tokens.
    assert tree["shape"]["key"] == gpu_check.TREE_SHAPE and set(tree["runs"]) == set(gpu_check.TREE_CONFIGS)
    assert tree["work"]["sharing"]["tokens"] < tree["work"]["pairwise"]["tokens"]
    for name in ("gpu-check-smoke.md", "gpu-throughput-smoke.md", "gpu-throughput-smoke.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    markdown = (tmp_path / "gpu-check-smoke.md").read_text()
    assert "# GPU check" in markdown and "## 0. First packed step" in markdown and "cold" in markdown
    assert "prefix trees over pairwise prefix sharing" in markdown and "Prefix trees, unpacked:" in markdown
    assert (
        "Prefix trees: prefix sharing (one tree per row) over pairwise"
        in (tmp_path / "gpu-throughput-smoke.md").read_text()
    )


def test_compile_cache_is_cold_in_a_new_folder_and_warm_after(tmp_path, monkeypatch):
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)  # and restored after the test, whatever the function sets
    cold = gpu_check.use_compile_cache(tmp_path)
    assert not cold["warm"]
    inductor = Path(cold["caches"]["TORCHINDUCTOR_CACHE_DIR"]["path"])
    assert inductor == (tmp_path / "compile-cache" / "inductor").resolve()
    (inductor / "fxgraph").mkdir(parents=True)
    (inductor / "fxgraph" / "entry").write_text("compiled")
    warm = gpu_check.use_compile_cache(tmp_path)
    assert warm["warm"] and warm["caches"]["TORCHINDUCTOR_CACHE_DIR"]["files_at_start"] == 1
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    given = gpu_check.use_compile_cache(tmp_path)["caches"]["TRITON_CACHE_DIR"]
    assert given["from_environment"] and given["path"] == str(tmp_path / "elsewhere")
