"""Helpers of the store-hardening tests: a small TRAK run, a deadline, damage to files."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import trax_attr
from linear_model import linear_apply

N, M, B, K = 64, 16, 32, 16
SRC = str(Path(__file__).resolve().parent.parent / "src")


def make(save_dir, n=N, **kwargs):
    kwargs = {"proj_dim": K, "proj_dtype": jnp.float32, "lambda_reg": 1e-2, **kwargs}
    return trax_attr.TRAKer(model=linear_apply, task="image_classification", train_set_size=n,
                            save_dir=save_dir, **kwargs)


def featurize(traker, params, train, model_id=0):
    x, y = train
    traker.load_checkpoint(params, model_id=model_id)
    if traker.finalized(model_id):
        return
    for start in range(0, len(x), B):
        traker.featurize(batch=(x[start:start + B], y[start:start + B]), num_samples=B)


def score(traker, params, target, model_id=0, exp_name="test"):
    traker.start_scoring_checkpoint(exp_name=exp_name, checkpoint=params, model_id=model_id,
                                    num_targets=len(target[0]))
    traker.score(batch=target, num_samples=len(target[0]))


def run(traker, checkpoints, data):
    """The whole script, resumable: featurize, finalize, score every checkpoint, scores."""
    train, target = data
    for model_id, params in enumerate(checkpoints):
        featurize(traker, params, train, model_id)
    traker.finalize_features()
    for model_id, params in enumerate(checkpoints):
        score(traker, params, target, model_id)
    return traker.finalize_scores(exp_name="test")


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the block after ``seconds`` (a hang fails the test)."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the call hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli_in_subprocess(*argv: str, timeout: float = 120, memory: int = 3 << 30):
    """``trax-attr argv`` in a fresh interpreter with at most ``memory`` bytes of address
    space (a reader of /dev/zero dies instead of eating the machine); (status, stdout,
    stderr), status None if it ran past ``timeout``."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, "
            f"({memory}, {memory})); from trax_attr import cli; sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": SRC, "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        return None, err.stdout or "", err.stderr or ""
    return proc.returncode, proc.stdout, proc.stderr


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def npy_offset(path: Path) -> int:
    """Where the data of a .npy file starts."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[version]
        read(handle)
        return handle.tell()
