#!/usr/bin/env bash
# Train one scene family's towers on a CUDA machine and pack them for the trip back.
#
# Renders FAMILY's scenes with every CPU, trains both towers there with `sparc towers --device cuda`
# (longer and with bigger batches than the 2-core defaults), and writes $OUT/towers-FAMILY.tar.gz (the
# folder `bench/towers/FAMILY` holds: towers.json, dino/, clip/, training_curves.png; the CLIP file's
# zeroed token rows compress to a few MB) and $OUT/towers-FAMILY.log. Unpack it over bench/towers/:
#   tar -C bench/towers -xzf towers-FAMILY.tar.gz
#
# On a machine without this project's packages, carry them as wheels (see bench/towers/README.md):
# with .whl/ present the script installs them into /tmp/site first.
#
#   FAMILY=shapes bash bench/towers_device.sh      # N=40000 scenes, 6,000 steps of each tower by default
set -euo pipefail
FAMILY=${FAMILY:-shapes}
N=${N:-40000}
DINO_STEPS=${DINO_STEPS:-6000}
CLIP_STEPS=${CLIP_STEPS:-6000}
DINO_BATCH=${DINO_BATCH:-256}
CLIP_BATCH=${CLIP_BATCH:-512}
CLIP_LAYOUT=${CLIP_LAYOUT:-vit}   # vit or resnet (see bench/towers/README.md)
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-runs/towers-device}
WORK=${WORK:-/tmp/sparc-towers}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
sparc() { "$PY" -c 'import sys; from sparc_core.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
{
  date -u
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  start=$(date +%s)
  sparc scenes --family "$FAMILY" --n "$N" --out "$WORK/scenes-$FAMILY" --workers 0 --overwrite --quiet
  echo "rendered $N scenes in $(( $(date +%s) - start )) s"
  sparc towers --scenes "$WORK/scenes-$FAMILY" --out "$WORK/towers/$FAMILY" --device "$DEVICE" \
    --dino-steps "$DINO_STEPS" --clip-steps "$CLIP_STEPS" --dino-batch "$DINO_BATCH" --clip-batch "$CLIP_BATCH" --clip-layout "$CLIP_LAYOUT" --quiet
  echo "done in $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/towers-$FAMILY.log"
tar -C "$WORK/towers" -czf "$OUT/towers-$FAMILY.tar.gz" "$FAMILY"
ls -la "$OUT"
