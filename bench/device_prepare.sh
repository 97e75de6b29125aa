#!/usr/bin/env bash
# Prepare the accelerator run (bench/device_train.sh), here where bagpipes is installed:
#  - .device/wheels: the pure-Python packages the device image lacks, at the versions installed
#    here (hydra-core, omegaconf, antlr4-python3-runtime, zuko), for Python 3.12;
#  - .device/sps_tables.npz: the portable simulator tables (python -m sedvae.sps export-tables);
#  - .device/cpu_reference.json: this CPU's on-the-fly simulator figures, for the device's JSON.
# .device/ is git-ignored; name it in the device call's carry list (it is ~37 MiB of the 64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${SEDVAE_DEVICE_DIR:-.device}
mkdir -p "$DEST/wheels"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in hydra-core omegaconf zuko; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$DEST/wheels" "$pkg==$(version $pkg)"
done
# antlr4-python3-runtime 4.9.3 (omegaconf's pin) is published as a source archive only
"$PY" -m pip wheel -q --no-deps -w "$DEST/wheels" \
  "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
[ -f "$DEST/sps_tables.npz" ] || PYTHONPATH=$PWD "$PY" -m sedvae.sps export-tables "$DEST/sps_tables.npz"
PYTHONPATH=$PWD "$PY" bench/simulator_onthefly.py --batches 4 --batch 64 | tail -1 > "$DEST/cpu_reference.json"
du -sh "$DEST"/* "$DEST"/wheels/*
