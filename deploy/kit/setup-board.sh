#!/bin/sh
# Run ON the board (Raspberry Pi OS / Debian / Ubuntu / JetPack; aarch64 or x86_64): installs
# the TVM runtime that loads and runs qcompiler artifacts, in a virtual environment.
#
#   sh setup-board.sh [VENV_DIR [WHEEL_DIR]]       VENV_DIR defaults to ~/qc-runtime
#
# Needs python3 with venv (Debian: apt-get install python3-venv). With WHEEL_DIR the install is
# offline, from wheels downloaded on another machine, e.g. for a Pi 4/5 with Python 3.11:
#   pip download --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
#       -d wheels/ apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0 cloudpickle psutil
# The versions are the ones qcompiler builds with (a library is loaded by the TVM that built
# it); apache-tvm-ffi is pinned because 0.1.15 breaks TVM 0.27.
set -eu
VENV="${1:-$HOME/qc-runtime}"
WHEELS="${2:-}"
python3 -m venv "$VENV"
if [ -n "$WHEELS" ]; then
    set -- --no-index --find-links "$WHEELS"
else
    set --
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "$@" \
    "apache-tvm==0.27.0.post1" "apache-tvm-ffi==0.1.14.post0" cloudpickle psutil
"$VENV/bin/python" -c "import tvm; print('TVM', tvm.__version__, 'ready in $VENV')"
