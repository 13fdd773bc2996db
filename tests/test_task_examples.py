"""The fastest task examples run end to end through TRAKer, and their attributions make
sense (same-class training examples score higher for most targets)."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_task_has_an_example():
    import trax_attr

    names = set(trax_attr.TASKS) - {"classification"}  # an alias of image_classification
    assert {f"task_{name}.py" for name in names} <= {p.name for p in EXAMPLES.glob("task_*.py")}


@pytest.mark.parametrize("name,minimum", [("task_binary_classification", 0.7),
                                          ("task_clip", 0.7)])
def test_example_runs(name, minimum, capsys):
    agreement = load(name).main()
    assert "scores" in capsys.readouterr().out
    assert agreement >= minimum
