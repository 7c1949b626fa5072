#!/bin/sh
# Run ON the board: start TVM's RPC server and register it with a tracker under a key.
#
#   sh start-server.sh TRACKER_HOST:TRACKER_PORT KEY [VENV_DIR]
#
# The RPC server (which needs cloudpickle and psutil beside TVM) runs whatever library it is sent: keep it on a private network, or reach the
# tracker through an SSH tunnel (see the README, "Boards"). qcompiler then finds it with
#   qc run ARTIFACT --rpc-tracker TRACKER_HOST:TRACKER_PORT --rpc-key KEY
set -eu
if [ $# -lt 2 ]; then
    echo "usage: sh start-server.sh TRACKER_HOST:TRACKER_PORT KEY [VENV_DIR]" >&2
    exit 2
fi
TRACKER="$1"
KEY="$2"
VENV="${3:-$HOME/qc-runtime}"
HOST="${QC_SERVER_HOST:-0.0.0.0}"
case "$HOST" in
    127.*|localhost) ;;
    *) echo "warning: the RPC server listens on $HOST and runs any library sent to it;" \
            "keep this board on a private network, or set QC_SERVER_HOST=127.0.0.1 and" \
            "reach it through an SSH tunnel" >&2 ;;
esac
exec "$VENV/bin/python" -m tvm.exec.rpc_server --tracker="$TRACKER" --key="$KEY" \
    --host="$HOST" --port="${QC_SERVER_PORT:-9090}" \
    --port-end="${QC_SERVER_PORT_END:-9199}"
