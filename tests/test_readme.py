"""The README's examples run and say what they claim."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import trax_attr
from conftest import linear_apply

README = (Path(__file__).parents[1] / "README.md").read_text()


def code_block(marker):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_custom_task_example_equals_the_builtin(digits, linear_checkpoints, tmp_path,
                                                monkeypatch):
    monkeypatch.chdir(tmp_path)                        # the example's default save_dir
    namespace = {"apply_fn": linear_apply, "n": 100}
    exec(code_block("class MyClassification"), namespace)
    custom = namespace["MyClassification"]()
    builtin = trax_attr.get_task("image_classification")
    params = linear_checkpoints[0]
    x, y = digits
    out = jax.vmap(lambda a, b: custom.get_output(linear_apply, params, a, b))(x[:50], y[:50])
    ref = jax.vmap(lambda a, b: builtin.get_output(linear_apply, params, a, b))(x[:50], y[:50])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(custom.get_out_to_loss_grad(linear_apply, params, (x[:50], y[:50])),
                               builtin.get_out_to_loss_grad(linear_apply, params, (x[:50], y[:50])),
                               rtol=1e-5, atol=1e-6)
    assert isinstance(namespace["traker"], trax_attr.TRAKer)


def test_functional_example_runs_in_jit(digits, linear_checkpoints):
    namespace = {"jax": jax, "jnp": jnp, "trax_attr": trax_attr, "apply_fn": linear_apply}
    exec(code_block("def attribute"), namespace)
    x, y = digits
    scores = namespace["attribute"](linear_checkpoints, (x[:300], y[:300]), (x[1500:1505], y[1500:1505]))
    assert scores.shape == (300, 5) and bool(jnp.isfinite(scores).all())
