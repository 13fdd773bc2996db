"""docs/custom_tasks.md runs: its python blocks, executed in order in one namespace."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "custom_tasks.md"


def test_custom_tasks_tutorial_runs():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5 and "out_to_loss_from_loss" in text
    namespace = {"__name__": "custom_tasks_tutorial"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {number}]", "exec"), namespace)
    assert namespace["scores"].shape == (300, 5)
