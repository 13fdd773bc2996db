"""`import trax_attr` never imports torch; torch modules are recognised without it."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "JAX_PLATFORMS": "cpu",
                               "PATH": "/usr/bin:/bin"})


def test_import_trax_attr_does_not_import_torch():
    result = run("""
        import sys
        import trax_attr
        trax_attr.as_model(lambda params, x: x)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                        or m == "trax_attr.interop" or m.startswith("trax_attr.interop."))
        print(loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import trax_attr loaded {result.stdout.strip()}"


def test_is_torch_module_without_torch():
    """A class that merely looks like torch's Module by name elsewhere is not one."""
    result = run("""
        import sys
        from trax_attr.models import is_torch_module
        class Module: pass
        print(is_torch_module(Module()), "torch" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
