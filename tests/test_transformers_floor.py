"""The oldest transformers pyproject.toml allows runs the parity and stage-2 tests: installed from PyPI beside
this environment (with the tokenizers and huggingface_hub it needs) and put first on the path of a pytest run."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the floor release needs beside it (its own pins: tokenizers>=0.22,<=0.23, huggingface-hub<1.0).
COMPANIONS = ["tokenizers==0.22.1", "huggingface_hub==0.35.3"]
TESTS = ["tests/test_parity_hf.py", "tests/test_parity_stage2.py", "tests/test_stage2_model.py"]


def test_the_lowest_allowed_transformers_passes_the_parity_tests(tmp_path):
    floor = re.search(r'"transformers>=([0-9.]+)', (REPO / "pyproject.toml").read_text()).group(1)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, f"transformers=={floor}.0", *COMPANIONS], check=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site)}
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert version == f"{floor}.0"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
