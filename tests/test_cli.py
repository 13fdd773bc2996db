"""The `trax-attr` command: the quick demo end to end, info/top/compare, one-line errors."""

import json
import struct

import jax
import numpy as np
import pytest

import trax_attr
from linear_model import linear_apply
from trax_attr import cli
from trax_attr.apps.demo import QUICK
from trax_attr.apps.report import LDS_PIXELS, PICTURES, grid_pixels


def png_size(path):
    """(width, height) from the PNG header, read independently of matplotlib."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    status = cli.main(["demo", "--quick", "--no-progress", "--out", str(root / "report"),
                       "--cache-dir", str(root / "cache")])
    return status, root


def test_demo_quick_writes_the_report(demo_run):
    status, root = demo_run
    report = root / "report"
    assert status == 0
    for name in ("index.html", "summary.json", *PICTURES):
        assert (report / name).is_file(), name
    # QUICK shows 3 targets with top-3 proponents and opponents: 750 x 535 pixels
    assert grid_pixels(QUICK.show, QUICK.k) == (750, 535)
    assert png_size(report / "proponents.png") == (750, 535)
    for name in PICTURES[1:]:
        assert png_size(report / name) == LDS_PIXELS == (640, 400), name
    html = (report / "index.html").read_text()
    for name in PICTURES:
        assert f'src="{name}"' in html, name
    summary = json.loads((report / "summary.json").read_text())
    assert sorted(summary["lds"]["TRAK"], key=int) == ["1", "2"]
    for method in ("TRAK", "grad-cosine", "grad-dot"):
        for result in summary["lds"][method].values():
            assert result["low"] <= result["mean"] <= result["high"]
    assert 0 <= summary["test_accuracy"]["ensemble"] <= 1
    assert set(summary["lambdas"]) == {"0", "1"}
    removal = summary["removal"]["by_k"]
    assert [row["k"] for row in removal] == list(QUICK.removed)
    scores = np.load(f"{summary['store']}/experiments/test/scores.npy")
    assert scores.shape == (QUICK.n_train, QUICK.n_test)


def test_demo_rerun_reuses_the_cache(demo_run, capsys):
    _, root = demo_run
    status, out, _ = run(capsys, "demo", "--quick", "--no-progress", "--out",
                         str(root / "report2"), "--cache-dir", str(root / "cache"))
    assert status == 0
    assert "reused 2 cached checkpoints" in out and "reused the TRAK store" in out
    first = json.loads((root / "report" / "summary.json").read_text())
    second = json.loads((root / "report2" / "summary.json").read_text())
    assert first["lds"] == second["lds"]


def test_demo_torch_agrees_with_flax(demo_run, capsys):
    """--torch reruns TRAK on the torch twin (interop, backend="converted"), reusing the
    cached checkpoints: with the identity projector the scores are the Flax ones to float
    rounding (measured: min Pearson 1.00000000, max rel diff 1.1e-6); with the demo's
    rademacher k = 32 the torch layout meets another random matrix (measured: median
    Pearson 0.78, min 0.54), so only a loose bound holds there."""
    pytest.importorskip("torch", reason="demo --torch needs torch (the interop extra)")
    _, root = demo_run
    status, out, _ = run(capsys, "demo", "--quick", "--torch", "--no-progress", "--out",
                         str(root / "report_torch"), "--cache-dir", str(root / "cache"))
    assert status == 0 and "reused the TRAK store" in out
    twin = json.loads((root / "report_torch" / "summary.json").read_text())["torch_twin"]
    exact, projected = twin["identity"], twin["projected"]
    assert exact["pearson"]["min"] > 0.9999 and exact["spearman"]["min"] > 0.999
    assert exact["max rel diff"]["max"] < 1e-4
    assert exact[f"top-{QUICK.k} proponents"]["min"] == 1
    assert projected["pearson"]["median"] > 0.3
    html = (root / "report_torch" / "index.html").read_text()
    assert "torch twin vs Flax CNN, identity projector" in html
    assert "torch twin vs Flax CNN, identity projector" in out


def test_demo_torch_without_interop_is_one_line(capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find_spec(name, *a))
    status, out, err = run(capsys, "demo", "--torch", "--quick")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--torch" in err and "interop" in err


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits, linear_checkpoints):
    """A real store: two checkpoints of a linear model, experiment 'test' of 5 targets."""
    x, y = digits
    save_dir = tmp_path_factory.mktemp("store") / "trak"
    traker = trax_attr.TRAKer(model=linear_apply, train_set_size=100, save_dir=save_dir,
                              proj_dim=16)
    for model_id, params in enumerate(linear_checkpoints):
        traker.load_checkpoint(params, model_id=model_id)
        traker.featurize(batch=(x[:100], y[:100]), num_samples=100)
    traker.finalize_features()
    for model_id, params in enumerate(linear_checkpoints):
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=params, model_id=model_id,
                                        num_targets=5)
        traker.score(batch=(x[100:105], y[100:105]), num_samples=5)
    scores = traker.finalize_scores(exp_name="test")
    # a second experiment left unfinished
    traker.start_scoring_checkpoint(exp_name="partial", checkpoint=linear_checkpoints[0],
                                    model_id=0, num_targets=3)
    return save_dir, scores


def test_info(store, capsys):
    save_dir, _ = store
    status, out, _ = run(capsys, "info", str(save_dir))
    assert status == 0
    assert "train_set_size: 100" in out and "checkpoints: 2" in out
    assert "model 0: 100/100 rows featurized, finalized" in out
    assert "test: 5 targets; targets scored per model {0: 5/5, 1: 5/5}; scores [100, 5]" in out
    assert "partial: 3 targets; targets scored per model {0: 0/3}; scores not finalized" in out


def test_info_on_a_kronecker_store(tmp_path, capsys, digits):
    """The kronecker projector's width comes from the model's layers: info reads it from
    the store (it once crashed parsing a width like "4x4+512")."""
    import flax.linen as nn

    x, y = digits
    module = nn.Dense(10)
    variables = module.init(jax.random.key(0), x[:1])
    traker = trax_attr.TRAKer(model=module, train_set_size=50, save_dir=tmp_path / "k",
                              projector=trax_attr.kronecker(4, 3, fallback_dim=8))
    traker.load_checkpoint(variables, model_id=0)
    traker.featurize(batch=(x[:50], y[:50]), num_samples=50)
    traker.finalize_features()
    status, out, err = run(capsys, "info", str(tmp_path / "k"))
    assert status == 0, err
    assert "feature_dim: 20" in out and "model 0: 50/50 rows featurized, finalized" in out
    assert '"kind": "kronecker"' in out


def test_top(store, capsys):
    save_dir, scores = store
    status, out, _ = run(capsys, "top", str(save_dir), "--exp", "test", "--target", "3",
                         "-k", "4")
    assert status == 0
    lines = out.splitlines()
    pro = lines.index("proponents (raise the target's output):")
    con = lines.index("opponents (lower it):")
    pro_rows = [int(line.split()[1]) for line in lines[pro + 2:pro + 6]]
    con_rows = [int(line.split()[1]) for line in lines[con + 2:con + 6]]
    order = np.argsort(scores[:, 3])
    assert pro_rows == order[::-1][:4].tolist()
    assert con_rows == order[:4].tolist()
    assert float(lines[pro + 2].split()[2]) == pytest.approx(scores[order[-1], 3], rel=1e-4)


def test_compare_npy_and_store(store, tmp_path, capsys):
    save_dir, scores = store
    same = tmp_path / "same.npy"
    np.save(same, scores)
    status, out, _ = run(capsys, "compare", str(same), str(save_dir), "--exp", "test", "-k", "5")
    assert status == 0
    rows = {line[:18].strip(): line[18:].split() for line in out.splitlines()[4:]}
    assert [float(v) for v in rows["pearson"]] == pytest.approx([1, 1, 1, 1], abs=1e-4)
    assert [float(v) for v in rows["top-5 proponents"]] == [1, 1, 1, 1]
    assert [float(v) for v in rows["top-5 opponents"]] == [1, 1, 1, 1]
    assert [float(v) for v in rows["max rel diff"]] == [0, 0, 0, 0]
    flipped = tmp_path / "flipped.npy"
    np.save(flipped, -scores)
    status, out, _ = run(capsys, "compare", str(flipped), str(same))
    rows = {line[:18].strip(): line[18:].split() for line in out.splitlines()[4:]}
    assert status == 0 and float(rows["spearman"][0]) == pytest.approx(-1, abs=1e-6)
    assert float(rows["max rel diff"][0]) == pytest.approx(2, abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["info", "{missing}"], "no trax_attr store at"),
    (["top", "{store}", "--exp", "nope", "--target", "0"], "experiment 'nope' is not in"),
    (["top", "{store}", "--exp", "partial", "--target", "0"], "has no scores yet"),
    (["top", "{store}", "--exp", "test", "--target", "5"], "--target 5 is out of range"),
    (["compare", "{store}", "{store}"], "name the experiment with --exp"),
    (["compare", "{missing}.npy", "{store}", "--exp", "test"], "does not exist"),
    (["compare", "{store}", "{other}", "--exp", "test"], "score shapes differ"),
])
def test_user_mistakes_are_one_line(store, tmp_path, capsys, argv, message):
    save_dir, scores = store
    other = tmp_path / "other.npy"
    np.save(other, scores[:, :2])
    names = {"store": str(save_dir), "missing": str(tmp_path / "missing"), "other": str(other)}
    status, out, err = run(capsys, *[a.format(**names) for a in argv])
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trax-attr: error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "missing").exists()   # looking did not create a store


def test_library_import_does_not_need_the_demo_extra():
    import subprocess
    import sys

    code = ("import sys, trax_attr, trax_attr.evaluation, trax_attr.cli; "
            "bad = {'matplotlib', 'sklearn', 'tqdm', 'torch'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the report in a real browser ------------------------------------------------------

_PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (i) {
    return {src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0}; });
  var pres = Array.from(document.querySelectorAll("pre")).map(function (p) {
    return p.scrollWidth - p.clientWidth; });
  var out = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
             images: images, preOverflow: pres, text: document.body.innerText.length};
  var probe = document.createElement("div");
  probe.textContent = "PROBE" + JSON.stringify(out) + "EBORP";
  document.body.appendChild(probe);
});
</script>"""


def _chromium():
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")


def _measure_in_browser(folder, html, tmp_path, width=1280):
    """Load ``html`` (with the report's pictures beside it) in headless Chromium at
    ``width`` px and return what the page measured of itself after its load event."""
    import re
    import shutil
    import subprocess

    page = tmp_path / "page"
    page.mkdir()
    for picture in PICTURES:
        if (folder / picture).exists():
            shutil.copy(folder / picture, page / picture)
    (page / "index.html").write_text(html.replace("</body>", _PROBE + "</body>"))
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900",
               "--virtual-time-budget=10000", "--dump-dom", (page / "index.html").as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.findall(r"PROBE(\{.*?\})EBORP", done.stdout)
    assert found, f"Chromium printed no measurement (status {done.returncode}): {done.stderr[-500:]}"
    return json.loads(found[-1])


def test_report_renders_in_a_browser_without_overflow(demo_run, tmp_path):
    """Headless Chromium at 1,280 px: every picture loads, nothing is wider than the window
    (the printed summary wraps), and the page has its text."""
    _, root = demo_run
    report = root / "report"
    seen = _measure_in_browser(report, (report / "index.html").read_text(), tmp_path)
    assert sorted(image["src"] for image in seen["images"]) == sorted(PICTURES)
    assert all(image["loaded"] for image in seen["images"]), seen["images"]
    assert seen["scrollWidth"] <= seen["innerWidth"] == 1280, seen
    assert seen["preOverflow"] and max(seen["preOverflow"]) == 0, seen
    assert seen["text"] > 2000


def test_browser_probe_sees_overflow(demo_run, tmp_path):
    """The measurement above can fail: a page with an unwrapped 3,000 px line and a
    missing picture is caught."""
    _, root = demo_run
    wide = ("<!doctype html><html><body><pre style='white-space:pre'>" + "x" * 400
            + "</pre><img src='missing.png'></body></html>")
    seen = _measure_in_browser(root / "report", wide, tmp_path)
    assert seen["scrollWidth"] > seen["innerWidth"]
    assert not seen["images"][0]["loaded"]
