"""The ``trax-attr`` command: a demo, and a look inside stores.

    trax-attr demo [--checkpoints M] [--proj-dim K] [--out DIR] [--cache-dir DIR] [--quick]
    trax-attr info SAVE_DIR
    trax-attr top SAVE_DIR --exp NAME --target J [-k 10]
    trax-attr compare A B [--exp NAME] [--exp-b NAME] [-k 10]
    trax-attr repair SAVE_DIR

User mistakes (a missing store, an unknown experiment, a target out of range) and every
store error (a corrupted or busy store, a failed write) end with one line on stderr that
says the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["main"]


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


# --- stores ----------------------------------------------------------------------------

def _open_store(save_dir: str):
    from .store import Store

    root = Path(save_dir)
    if not os.path.lexists(root / "store.json") and not any(
            os.path.lexists(root / name) for name in ("models", "experiments")):
        raise CLIError(f"no trax_attr store at {save_dir!r} (no store.json there); pass the "
                       "save_dir given to TRAKer, e.g. ./trak_results")
    return Store(root, {})


def _load_scores(store, exp: str | None) -> np.ndarray:
    names = store.experiment_names()
    if exp is None:
        raise CLIError(f"{store.root} is a store: name the experiment with --exp (one of "
                       f"{names or 'none yet'})")
    if exp not in names:
        raise CLIError(f"experiment {exp!r} is not in {store.root} (experiments: "
                       f"{', '.join(names) or 'none'}); pass one of those to --exp")
    if "scores" not in (store.experiment_meta(exp) or {}):
        raise CLIError(f"experiment {exp!r} has no scores yet; call "
                       f"traker.finalize_scores(exp_name={exp!r}) first")
    return store.load_scores(exp)


def info(save_dir: str, out=None) -> None:
    """Print what a store holds."""
    out = out or sys.stdout
    store = _open_store(save_dir)
    n = store.train_set_size if store.train_set_size is not None else "?"
    config = dict(store.config)
    params = config.pop("parameters", None)
    print(f"store {store.root}", file=out)
    for key in sorted(config):
        print(f"  {key}: {json.dumps(config[key])}", file=out)
    if params:
        print(f"  parameters ({len(params)} leaves): {', '.join(params[:6])}"
              + (", ..." if len(params) > 6 else ""), file=out)
    ids = store.model_ids()
    print(f"checkpoints: {len(ids)}", file=out)
    for model_id in ids:
        meta = store.model_meta(model_id)
        rows = int(np.count_nonzero(store.rows_done(model_id)))
        state = "not finalized"
        if meta.get("finalized"):
            lam = meta.get("lambda") or {}
            state = (f"finalized with lambda_reg={lam.get('lambda_reg')!r} "
                     f"(λ = {lam.get('value', float('nan')):.4g})")
        print(f"  model {model_id}: {rows}/{n} rows featurized, {state}", file=out)
    names = store.experiment_names()
    print(f"experiments: {len(names)}", file=out)
    for name in names:
        meta = store.experiment_meta(name)
        m = int(meta["num_targets"])
        parts = []
        for model_id in meta["model_ids"]:
            done = int(np.count_nonzero(store.rows_done(model_id, name)))
            parts.append(f"{model_id}: {done}/{m}")
        record = meta.get("scores")
        final = (f"scores [{n}, {m}] (model_ids {record.get('model_ids')})" if record
                 else "scores not finalized")
        print(f"  {name}: {m} targets; targets scored per model {{{', '.join(parts)}}}; "
              f"{final}", file=out)


def top(save_dir: str, exp: str, target: int, k: int, out=None) -> None:
    """Print the strongest proponents and opponents of one target."""
    out = out or sys.stdout
    store = _open_store(save_dir)
    scores = _load_scores(store, exp)
    n, m = scores.shape
    if not 0 <= target < m:
        raise CLIError(f"--target {target} is out of range: experiment {exp!r} has {m} "
                       f"targets, pass 0..{m - 1}")
    if k < 1:
        raise CLIError(f"-k {k} must be at least 1")
    k = min(k, n)
    column = scores[:, target]
    order = np.argsort(-column, kind="stable")
    print(f"target {target} of experiment {exp!r} ({n} training examples)", file=out)
    for title, rows in (("proponents (raise the target's output)", order[:k]),
                        ("opponents (lower it)", order[::-1][:k])):
        print(f"{title}:", file=out)
        print(f"  {'rank':>4}  {'train index':>11}  {'score':>12}", file=out)
        for rank, i in enumerate(rows, 1):
            print(f"  {rank:>4}  {i:>11}  {column[i]:>+12.5g}", file=out)


def _scores_from(path: str, exp: str | None) -> np.ndarray:
    source = Path(path)
    if source.suffix == ".npy":
        if not source.is_file():
            raise CLIError(f"score file {path!r} does not exist; pass a .npy score matrix or "
                           "a store folder with --exp")
        try:
            array = np.load(source, allow_pickle=False)
        except ValueError as err:
            raise CLIError(f"{path!r} is not a plain .npy array ({err})") from None
        if array.ndim != 2:
            raise CLIError(f"{path!r} holds shape {array.shape}; expected a (n_train, "
                           "n_targets) score matrix")
        return array
    return _load_scores(_open_store(path), exp)


def compare(a: str, b: str, exp: str | None, exp_b: str | None, k: int,
            out=None) -> None:
    """Print the agreement table of two score matrices (B is the reference)."""
    out = out or sys.stdout
    from .evaluation import compare_scores

    first = _scores_from(a, exp)
    second = _scores_from(b, exp_b if exp_b is not None else exp)
    if first.shape != second.shape:
        raise CLIError(f"score shapes differ: {a} is {first.shape}, {b} is {second.shape}; "
                       "compare scores of the same training set and targets")
    if not 1 <= k <= first.shape[0]:
        raise CLIError(f"-k {k} must be in 1..{first.shape[0]} (the number of training rows)")
    agreement = compare_scores(first, second, k=k)
    print(f"A = {a}\nB = {b} (reference)\n{first.shape[0]} training examples x "
          f"{first.shape[1]} targets; per-target statistics:", file=out)
    print(agreement.table(), file=out)


def repair(save_dir: str, out=None) -> None:
    """Rewrite a lost store.json from the settings its checkpoints recorded."""
    from .store import Store

    print(Store.repair(save_dir), file=out or sys.stdout)


# --- demo ------------------------------------------------------------------------------

def demo(args) -> None:
    import dataclasses

    if args.torch:
        if importlib.util.find_spec("torch") is None:
            raise CLIError("--torch needs the interop extra (pip install 'trax_attr[interop]'); "
                           "it is not available in this installation")
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        raise CLIError(f"the demo needs the demo extra ({err.name} is missing); run "
                       "pip install 'trax_attr[demo]'") from None
    from .apps.demo import QUICK, DemoConfig, run_demo

    config = QUICK if args.quick else DemoConfig()
    changes = {}
    if args.checkpoints is not None:
        if args.checkpoints < 1:
            raise CLIError(f"--checkpoints {args.checkpoints} must be at least 1")
        changes["checkpoints"] = args.checkpoints
    if args.proj_dim is not None:
        if args.proj_dim < 1:
            raise CLIError(f"--proj-dim {args.proj_dim} must be at least 1")
        changes["proj_dim"] = args.proj_dim
    config = dataclasses.replace(config, **changes)
    run_demo(config, args.out, args.cache_dir, progress=False if args.no_progress else None,
             torch=args.torch)


# --- entry point -----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trax-attr", description="TRAK training-data attribution, JAX-native.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train small CNNs on digits, run TRAK, write a report")
    p.add_argument("--checkpoints", type=int, help="models in the ensemble (default 8)")
    p.add_argument("--proj-dim", type=int, help="projected dimension k (default 512)")
    p.add_argument("--out", default="demo_report", help="report folder (default demo_report)")
    p.add_argument("--cache-dir", default=".cache/trax-attr",
                   help="cache of checkpoints, stores and retrained models "
                        "(default .cache/trax-attr)")
    p.add_argument("--quick", action="store_true", help="a tiny setting, seconds (for tests)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only on a terminal anyway)")
    p.add_argument("--torch", action="store_true",
                   help="run the same demo on the torch twin through interop")

    p = sub.add_parser("info", help="what a store holds")
    p.add_argument("save_dir")

    p = sub.add_parser("top", help="strongest proponents and opponents of a target")
    p.add_argument("save_dir")
    p.add_argument("--exp", required=True, help="experiment name")
    p.add_argument("--target", type=int, required=True, help="target index")
    p.add_argument("-k", type=int, default=10, help="how many of each (default 10)")

    p = sub.add_parser("compare", help="agreement of two score matrices or stores")
    p.add_argument("a", help="a .npy (n_train, n_targets) score matrix or a store folder")
    p.add_argument("b", help="the same, the reference")
    p.add_argument("--exp", help="experiment of store A (and of B unless --exp-b)")
    p.add_argument("--exp-b", help="experiment of store B")
    p.add_argument("-k", type=int, default=10, help="k of the top-k overlap (default 10)")

    p = sub.add_parser("repair", help="rewrite a lost store.json from the settings its "
                                      "checkpoints recorded")
    p.add_argument("save_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a user mistake or a
    store error)."""
    from .store import StoreBusyError

    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo(args)
        elif args.command == "info":
            info(args.save_dir)
        elif args.command == "top":
            top(args.save_dir, args.exp, args.target, args.k)
        elif args.command == "compare":
            compare(args.a, args.b, args.exp, args.exp_b, args.k)
        elif args.command == "repair":
            repair(args.save_dir)
    except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
        sys.stderr.close()
        return 0
    except (CLIError, ValueError, StoreBusyError, OSError) as err:
        # the store's errors (corrupted: a ValueError; busy; a failed read or write) say
        # what to do; the demo's own failures keep their traceback
        if args.command == "demo" and not isinstance(err, CLIError):
            raise
        print(f"trax-attr: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
