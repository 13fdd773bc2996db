"""The README and the user guide: their examples run and say what they claim."""

import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
USAGE = (ROOT / "docs" / "usage.md").read_text()


def code_block(text, marker):
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_fits_in_five_minutes():
    """A newcomer's page: under 300 lines, the two Quickstart commands exactly."""
    assert len(README.splitlines()) < 300
    quickstart = README[README.index("## Quickstart"):]
    commands = re.findall(r"```bash\n(.*?)```", quickstart, re.S)[0]
    assert [line.split("#")[0].strip() for line in commands.strip().splitlines()] == [
        "make demo", "make test"]
    example = code_block(README, "trax_attr.TRAKer(")
    assert len(example.strip().splitlines()) <= 30


def test_readme_links_resolve():
    for target in re.findall(r"\]\((?!https?://)([^)#]+)", README):
        assert (ROOT / target).exists(), target


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's example, as written: three sklearn MLPs, TRAK scores (1200, 50); the
    top-5 proponents share the target's class far more often than chance (about 0.1;
    measured 0.44)."""
    pytest.importorskip("sklearn", reason="the README example uses scikit-learn (demo extra)")
    monkeypatch.chdir(tmp_path)                       # its save_dir="trak_results"
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no ConvergenceWarning, no other
        exec(compile(code_block(README, "trax_attr.TRAKer("), "README.md", "exec"), namespace)
    scores, (_, y_train), (_, y_test) = namespace["scores"], namespace["train"], namespace["test"]
    assert scores.shape == (1200, 50) and np.isfinite(scores).all()
    top = np.argsort(-scores, axis=0)[:5]
    assert (y_train[top] == y_test[None]).mean() > 0.25
    assert set(namespace["traker"].lambdas()) == {0, 1, 2}


def test_custom_task_example_equals_the_builtin(digits, linear_checkpoints, tmp_path,
                                                monkeypatch):
    monkeypatch.chdir(tmp_path)                        # the example's default save_dir
    namespace = {"apply_fn": linear_apply, "n": 100}
    exec(code_block(USAGE, "class MyClassification"), namespace)
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
    exec(code_block(USAGE, "def attribute"), namespace)
    x, y = digits
    scores = namespace["attribute"](linear_checkpoints, (x[:300], y[:300]), (x[1500:1505], y[1500:1505]))
    assert scores.shape == (300, 5) and bool(jnp.isfinite(scores).all())
