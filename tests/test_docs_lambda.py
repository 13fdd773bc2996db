"""docs/lambda.md runs: its python blocks, executed in order in one namespace."""

import pathlib
import re

import numpy as np

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "lambda.md"


def test_lambda_page_runs():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2 and "resolve_lambda" in text
    namespace = {"__name__": "lambda_page"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {number}]", "exec"), namespace)
    # the page's claims, checked independently of its own asserts
    phi = namespace["traker"].train_features(0).astype(np.float64)
    assert np.isclose(namespace["auto_value"], 0.75 * np.sum(phi ** 2) / len(phi), rtol=1e-5)
    assert namespace["traker"].lambdas()[0]["lambda_reg"] == 1e-2
    assert not np.allclose(namespace["auto_scores"], namespace["small_scores"])
