"""benchmarks/gpu_suite.py in its --smoke mode (tiny configs on CPU): every section runs and reports, parity holds
in fp32 and bf16, so that the one-call GPU check cannot rot while no GPU is around."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_suite_runs_every_section_in_smoke_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    errors = {name: s.get("traceback") for name, s in results["sections"].items() if "error" in s}
    assert done.returncode == 0 and not errors, (errors, done.stderr[-2000:])
    sections = results["sections"]
    assert set(sections) == {"parity", "stage1", "stage2", "features", "faiss"}
    parity = sections["parity"]["result"]
    assert parity["ok"] and parity["fp32_itc"] <= 1e-5 and parity["fp32_logits"] <= 1e-4
    stage1 = sections["stage1"]["result"]
    assert stage1["eager"]["samples_per_s"] > 0 and stage1["compiled"]["samples_per_s"] > 0 and 0 < stage1["eager"]["mfu"] < 1
    assert all(stage1["eager"]["phase_ms"][p] > 0 for p in ("vit_forward", "qformer_forward", "backward", "optimizer"))
    assert sections["stage2"]["result"]["opt"]["captions_per_s_beam5"] > 0 and sections["stage2"]["result"]["t5"]["samples_per_s"] > 0
    assert sections["features"]["result"]["max_abs_difference"] < 1e-4
    assert sections["faiss"]["result"]["flat_cpu_queries_per_s"] > 0
    assert "## stage1" in (tmp_path / "results.md").read_text()
