"""The model zoo's featurize throughput: each route of trax_attr against traker 0.3.2.

The tiny models of tests/zoo (torchvision resnet18, HF BERT and GPT-2, HF CLIPModel,
open_clip CLIP; random init, nothing downloaded; transformers of two layers, where the
tests use one), each through its TRAKer (store writes
included) with the same parameters differentiated, proj_dim and float32 projection:
trax_attr's backend="torch" and backend="converted" (where the converter takes the model),
and traker 0.3.2 on the CPU (BasicProjector) where traker has the task, called as its users
call it (``grad_wrt=``: traker computes every parameter's gradient, then keeps those).
Examples/s over the batches after the first (the warm-up), one pass.

    python benchmarks/zoo.py [--batches 4] [--batch-size 8]

Prints a markdown table and writes benchmarks/results/zoo.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from torchvision_ops import define_torchvision_ops  # noqa: E402

define_torchvision_ops()  # torchvision's compiled ops do not load next to torch 2.13.0+cpu
sys.path.insert(0, str(ROOT / "tests" / "zoo"))

import trax_attr  # noqa: E402
import zoo_models as zoo  # noqa: E402
from trax_attr import interop  # noqa: E402

PROJ_DIM = 256


def timed(featurize_all, batches) -> float:
    """Examples/s of ``featurize_all(batches[1:])`` after ``featurize_all(batches[:1])``."""
    featurize_all(batches[:1])
    start = time.perf_counter()
    featurize_all(batches[1:])
    return sum(len(b[0]) for b in batches[1:]) / (time.perf_counter() - start)


def ours(model, task, batches, grad_wrt, backend) -> float:
    n = sum(len(b[0]) for b in batches)
    with tempfile.TemporaryDirectory() as folder:
        if backend == "converted":
            model = interop.torch_model(model, "converted")
            backend = None
        traker = trax_attr.TRAKer(model=model, task=task, train_set_size=n, save_dir=folder,
                                  proj_dim=PROJ_DIM, proj_dtype=jnp.float32,
                                  grad_wrt=grad_wrt, backend=backend)
        traker.load_checkpoint(None, model_id=0)

        def run(some):
            for b in some:
                traker.featurize(batch=b, num_samples=len(b[0]))

        return timed(run, batches)


def traker(model, task, batches, grad_wrt) -> float:
    import trak

    n = sum(len(b[0]) for b in batches)
    as_torch = lambda arrays: tuple(  # noqa: E731
        torch.from_numpy(np.asarray(a)).long() if np.issubdtype(np.asarray(a).dtype, np.integer)
        else torch.from_numpy(np.asarray(a)) for a in arrays)
    with tempfile.TemporaryDirectory() as folder:
        reference = trak.TRAKer(model=model, task=task, train_set_size=n, save_dir=folder,
                                device="cpu", use_half_precision=False, proj_dim=PROJ_DIM,
                                grad_wrt=grad_wrt, logging_level=logging.ERROR)
        reference.load_checkpoint(model.state_dict(), model_id=0)

        def run(some):
            for b in some:
                reference.featurize(batch=as_torch(b), num_samples=len(b[0]))

        return timed(run, batches)


def batched(make, n_batches, size):
    return [make(seed, size) for seed in range(n_batches)]


def cases(n_batches, size):
    """(name, module, task, batches, grad_wrt (ours), traker (module, task, batches, names)|None)."""
    from test_huggingface import TrakerTextModel

    resnet = zoo.resnet18()
    resnet_wrt = ["layer4.*.bn*", "fc.*"]
    resnet_names = [n for n, _ in resnet.named_parameters()
                    if n.startswith("fc.") or (n.startswith("layer4.") and ".bn" in n)]
    images = batched(zoo.images, n_batches, size)
    yield ("torchvision resnet18 (16x16, layer4 BN + fc)", resnet, "image_classification",
           images, resnet_wrt, (resnet, "image_classification", images, resnet_names))

    bert = zoo.bert(layers=2)
    text = batched(zoo.text, n_batches, size)
    reorder = [(b[0], b[2], b[1], b[3]) for b in text]
    names = [n for n, _ in bert.named_parameters()]
    yield ("HF BertForSequenceClassification (2 layers, 32 wide)", bert, "text_classification",
           text, None, (TrakerTextModel(bert), "text_classification", reorder,
                        [f"model.{n}" for n in names]))

    gpt2 = zoo.gpt2(layers=2)
    lm = [zoo.text(seed, size, length=10, vocab=48)[:2] for seed in range(n_batches)]
    yield "HF GPT2LMHeadModel (2 layers, 32 wide)", gpt2, "causal_lm", lm, None, None

    for name, module in (
            ("HF CLIPModel (2+2 layers, 32 wide)", zoo.hf_clip(layers=2)),
            ("open_clip CLIP (2+2 layers, 32 wide)", zoo.open_clip_model(layers=2))):
        images, texts, _ = zoo.clip_pairs(9, 16)
        bank = trax_attr.clip_embedding_bank(module, None, images, texts, backend="torch")
        task = trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=8)
        pairs = [zoo.clip_pairs(seed, size, start=seed * size) for seed in range(n_batches)]
        yield name, module, task, pairs, None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, module, task, batches, grad_wrt, reference in cases(args.batches,
                                                                  args.batch_size):
        row = {"model": name, "torch": ours(module, task, batches, grad_wrt, "torch")}
        try:
            row["converted"] = ours(module, task, batches, grad_wrt, "converted")
        except Exception as err:  # noqa: BLE001 - the converter's reason is the result
            row["converted"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if reference is not None:
            row["traker"] = traker(*reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | torch ex/s | converted ex/s | traker 0.3.2 ex/s | torch / traker |")
    print("|---|---|---|---|---|")
    for r in rows:
        conv = r["converted"]
        conv = f"{conv:.1f}" if isinstance(conv, float) else "fails: " + conv[:60]
        ref = r.get("traker")
        ratio = f"{r['torch'] / ref:.1f}x" if ref else "—"
        print(f"| {r['model']} | {r['torch']:.1f} | {conv} | "
              f"{f'{ref:.1f}' if ref else 'no such task'} | {ratio} |")
    out = ROOT / "benchmarks" / "results" / "zoo.json"
    out.write_text(json.dumps({"batch_size": args.batch_size, "batches": args.batches,
                               "proj_dim": PROJ_DIM, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
