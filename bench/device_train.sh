#!/usr/bin/env bash
# The prepared accelerator run (issue 27): install the carried wheels, then train the posterior
# head and the emulator on on-the-fly simulations for fixed wall-clock budgets (bench/device_train.py;
# defaults 270 s + 150 s, about 8 minutes in all with setup) and write the checkpoints, logs and a
# throughput JSON line to $OUT.
#
#   bench/device_prepare.sh                        # here, once: wheels + tables into .device/
#   device run, carry [".device"], timeout 600:   bash bench/device_train.sh
#
# Extra arguments go to bench/device_train.py (e.g. --posterior-s 60 --emulator-s 30 --toy).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
: "${OUT:?set OUT to the folder for the results}"
DEVICE_DIR=${SEDVAE_DEVICE_DIR:-.device}
export SEDVAE_SPS_TABLES=${SEDVAE_SPS_TABLES:-$DEVICE_DIR/sps_tables.npz}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# pure-Python packages the device image lacks (hydra-core, omegaconf, antlr4, zuko): install the
# carried wheels only where they are missing
if ! "$PY" -c "import hydra, omegaconf, zuko" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sedvae_site "$DEVICE_DIR"/wheels/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/sedvae_site
fi
[ -f "$SEDVAE_SPS_TABLES" ] || { echo "missing $SEDVAE_SPS_TABLES: run bench/device_prepare.sh"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv || true
ref=()
[ -f "$DEVICE_DIR/cpu_reference.json" ] && ref=(--cpu-reference "$DEVICE_DIR/cpu_reference.json")
set -o pipefail
"$PY" bench/device_train.py --out "$OUT" --work "${TMPDIR:-/tmp}/sedvae_device_work" "${ref[@]}" "$@" \
  2>&1 | tee "$OUT/device_train.log"
