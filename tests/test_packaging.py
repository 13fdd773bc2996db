"""The wheel: it builds without a setuptools deprecation warning, carries the metadata a
Python user expects, and `import trax_attr` works from an installed copy, away from the
repository (the check of `pip install .` that needs no network: the dependencies come from
the running environment)."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    from importlib.metadata import PackageNotFoundError, version

    out = tmp_path_factory.mktemp("wheel")
    try:   # the installed setuptools when it is recent enough (no download), else pip's own
        isolation = int(version("setuptools").split(".")[0]) < 77
    except PackageNotFoundError:
        isolation = True
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out),
               str(ROOT)] + ([] if isolation else ["--no-build-isolation"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("trax_attr-*.whl")
    return path, done.stdout + done.stderr


def test_wheel_builds_without_deprecation_warnings(wheel):
    _, log = wheel
    assert "deprecated" not in log.lower(), log[-2000:]


def test_wheel_metadata(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(meta).decode()
    assert "License-Expression: MIT" in metadata
    assert "Requires-Python: >=3.11" in metadata
    for extra in ("demo", "interop", "test", "docs"):
        assert f"Provides-Extra: {extra}" in metadata
    # the demo extra is what the demo needs, and not torch
    demo = [line for line in metadata.splitlines() if 'extra == "demo"' in line]
    assert demo and not any("torch" in line for line in demo), demo
    assert any(n.endswith("dist-info/licenses/LICENSE") for n in names)
    for module in ("trax_attr/__init__.py", "trax_attr/apps/demo.py", "trax_attr/apps/report.py",
                   "trax_attr/engine/linalg.py", "trax_attr/interop/__init__.py",
                   "trax_attr/store/store.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)


def test_installed_wheel_imports_away_from_the_repository(wheel, tmp_path):
    path, _ = wheel
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # the dependencies (jax, flax, ...) from the running environment, after the venv's own
    # site-packages, so that the wheel's copy of trax_attr is the one found
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "deps.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(path)], check=True, timeout=300)
    code = ("import sys, trax_attr, trax_attr.apps.demo, trax_attr.cli; "
            "print(trax_attr.__file__); "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(env_dir) in done.stdout and str(ROOT) not in done.stdout, done.stdout
    done = subprocess.run([str(env_dir / "bin" / "trax-attr"), "info", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "no trax_attr store" in done.stderr
