#!/usr/bin/env bash
# The 16-core measurements that issue 10's goals need, as one prepared command for a lent machine (README,
# Performance): the scaling benchmark sized to fit one call, then the default job. The machine has Python with
# numpy and msgpack but no pyzmq and no network, so pyzmq comes from a wheel carried in the ignored .whl/ folder,
# fetched here first:
#
#     pip download pyzmq --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
#
# Run from the repository root, with OUT set to the folder whose files come back (default: /tmp/psrv-device).
# PYTHON names the interpreter (default python3); SCALING_BUDGET_S bounds the scaling benchmark (default 360 s,
# so that both fit a 10-minute call).
set -euo pipefail
out="${OUT:-/tmp/psrv-device}/bench"
mkdir -p "$out"
python="${PYTHON:-python3}"
if ! "$python" -c "import zmq" 2>/dev/null; then
    site=/tmp/psrv-pyzmq
    "$python" -m pip install -q --no-index --find-links .whl --target "$site" pyzmq
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import numpy, zmq, msgpack, os; print('cores', len(os.sched_getaffinity(0)), 'numpy', numpy.__version__, 'pyzmq', zmq.__version__)"
# the modes issue 10's 16-core goals name (BSP, ASP, the two that talk less), so that two rounds fit the budget;
# PSRV_SCALING_MODES="" runs every mode
PSRV_SCALING_MODES="${PSRV_SCALING_MODES-bsp,asp,localH,groupK}" \
    "$python" -m benchmarks --only scaling --budget-s "${SCALING_BUDGET_S:-360}" --out "$out"
"$python" -m benchmarks --only defaultjob --out "$out"
