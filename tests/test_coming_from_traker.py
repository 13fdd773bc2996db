"""Every argument of traker 0.3.2's TRAKer that trax_attr's TRAKer does not take is refused
with an error that names its replacement (the README's "Coming from traker" table)."""

import inspect

import pytest

import trax_attr

trak = pytest.importorskip("trak", reason="traker 0.3.2 (the test extra) is not installed")

OURS = set(inspect.signature(trax_attr.TRAKer.__init__).parameters)
THEIRS = [name for name in inspect.signature(trak.TRAKer.__init__).parameters
          if name not in OURS]


def test_traker_has_arguments_we_replace():
    assert {"projector_seed", "device", "use_half_precision"} <= set(THEIRS)


@pytest.mark.parametrize("name", THEIRS)
def test_each_traker_argument_names_its_replacement(name, tmp_path):
    with pytest.raises(TypeError, match=f"traker's argument {name}=; here use ") as info:
        trax_attr.TRAKer(model=lambda params, x: x @ params, task="image_classification",
                         train_set_size=4, save_dir=str(tmp_path / "s"), **{name: None})
    assert "Coming from traker" in str(info.value)
    assert not (tmp_path / "s").exists()      # refused before anything touches disk


def test_a_typo_is_still_a_plain_unexpected_argument(tmp_path):
    with pytest.raises(TypeError, match="proj_dimm"):
        trax_attr.TRAKer(model=lambda params, x: x @ params, train_set_size=4,
                         save_dir=str(tmp_path), proj_dimm=8)
