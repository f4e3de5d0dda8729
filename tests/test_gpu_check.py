"""`benchmark/gpu_check.py --smoke`: the GPU checks' pipeline on CPU (tiny model, sdpa), as CI runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_phase(tmp_path):
    # A generous budget: the phases must finish on a loaded machine too (alone, the smoke run takes under a minute).
    command = [sys.executable, "benchmark/gpu_check.py", "--smoke", "--output-dir", str(tmp_path)]
    done = subprocess.run(
        [*command, "--budget-seconds", "600"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu-check-smoke.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["exactness", "bf16", "compiles", "benchmark"]
    assert not [phase["error"] for phase in phases.values() if phase.get("error")]
    cases = phases["exactness"]["cases"]
    assert len(cases) == 11 and all(case["passed"] for case in cases), cases
    assert phases["bf16"]["result"]["passed"]
    modes = phases["compiles"]["modes"]
    assert len(modes) == 3 and all(mode["passed"] and mode["steps"] == 20 for mode in modes), modes
    runs = phases["benchmark"]["payload"]["results"][0]["runs"]
    assert set(runs) == {"baseline", "sharing", "packing", "sharing+packing"}
    for name in ("gpu-check-smoke.md", "gpu-throughput-smoke.md", "gpu-throughput-smoke.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "# GPU check" in (tmp_path / "gpu-check-smoke.md").read_text()
