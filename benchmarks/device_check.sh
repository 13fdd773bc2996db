#!/usr/bin/env bash
# Featurize throughput on the accelerator against its own bf16 matmul rate.
#
#   bash benchmarks/device_check.sh            # on a GPU machine: wide MLP + ResNet-18, < 5 min
#   bash benchmarks/device_check.sh --small    # anywhere (CPU too): tiny sizes, a check that it runs
#
# Uses $PYTHON if set, else the shared venv's python, else python3. Writes
# device_featurize.json to $OUT when set (the device runner's folder), else to
# benchmarks/results/. The run is bounded by `timeout` ($DEVICE_CHECK_TIMEOUT, default 280 s) so
# the whole stays under 5 minutes; --small on a loaded CPU may need a larger bound.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x /work/wt/engine/.venv/bin/python ] && echo /work/wt/engine/.venv/bin/python || echo python3 )}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout "${DEVICE_CHECK_TIMEOUT:-280}" "$PYTHON" benchmarks/device_featurize.py "$@"
