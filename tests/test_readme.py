"""The README's model-building Python example runs as written (the others need trained checkpoints)."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "create_model(" in b]
    assert len(blocks) == 1, "the README has one model-building Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["itc"].shape == (2, 2) and namespace["itm"].shape == (2, 2)
