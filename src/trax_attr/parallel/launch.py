"""Start a script as N cooperating JAX processes on this machine (CPU, gloo collectives).

    python -m trax_attr.parallel.launch --num-processes 2 examples/multihost.py --save-dir /tmp/run

Each child gets ``TRAX_ATTR_COORDINATOR`` (127.0.0.1:<free port>), ``TRAX_ATTR_NUM_PROCESSES``
and ``TRAX_ATTR_PROCESS_ID`` in its environment, plus ``JAX_PLATFORMS=cpu`` and
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`` (environment, so that no library code changes
JAX's configuration); the script calls :func:`initialize` before any other JAX call.

On a real cluster do not use this launcher: start one process per host with the cluster's
own tool (``srun``, a Kubernetes job, a TPU pod's ``gcloud ... --worker=all``) and call
:func:`initialize` there too; without the variables above it calls
``jax.distributed.initialize()``, which reads the cluster's environment (SLURM, TPU, ...).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

__all__ = ["initialize", "free_port", "main"]


def initialize() -> None:
    """``jax.distributed.initialize`` from this launcher's variables, or the cluster's."""
    import jax

    address = os.environ.get("TRAX_ATTR_COORDINATOR")
    if address is None:
        jax.distributed.initialize()
        return
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=int(os.environ["TRAX_ATTR_NUM_PROCESSES"]),
                               process_id=int(os.environ["TRAX_ATTR_PROCESS_ID"]))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trax_attr.parallel.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="simulated CPU devices in each process")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before every process is killed")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    if opts.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {opts.num_processes}")
    port = opts.port or free_port()
    children = []
    for index in range(opts.num_processes):
        env = dict(os.environ, TRAX_ATTR_COORDINATOR=f"127.0.0.1:{port}",
                   TRAX_ATTR_NUM_PROCESSES=str(opts.num_processes),
                   TRAX_ATTR_PROCESS_ID=str(index), JAX_PLATFORMS="cpu",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   JAX_NUM_CPU_DEVICES=str(opts.devices_per_process))
        children.append(subprocess.Popen([sys.executable, opts.script, *opts.args], env=env))
    codes = []
    try:
        for child in children:
            codes.append(child.wait(timeout=opts.timeout))
    except subprocess.TimeoutExpired:
        for child in children:
            child.kill()
        print(f"launch: timed out after {opts.timeout} s; killed all processes", file=sys.stderr)
        return 124
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return max(codes, key=abs) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
