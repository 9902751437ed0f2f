#!/usr/bin/env bash
# The dashboard a user opens shows the run: starts `tensorboard --logdir` on a real run's event
# files, loads its scalars page in headless Chromium (Debian's `chromium` package) and saves a
# screenshot. Run before a release (not part of `make test`: it needs a browser), then look at
# the picture:
#   bash benchmarks/tensorboard_screenshot.sh [RUN_DIR] [OUT.png]
# RUN_DIR: a run folder with tensorboard/ inside; without one, a short 2-rank CPU run on
# synthetic data is made first (about a minute). OUT.png: docs/img/tensorboard.png by default.
# Fails (non-zero, one line) when TensorBoard serves no scalars for the run, or the screenshot
# is not written.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TB=${TENSORBOARD:-$(dirname "$PY")/tensorboard}
RUN=${1:-}
OUT=${2:-docs/img/tensorboard.png}
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROMIUM" ] || { echo "no chromium: apt-get install -y chromium" >&2; exit 2; }
WORK=$(mktemp -d)
TB_PID=
cleanup() { [ -n "$TB_PID" ] && kill "$TB_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

if [ -z "$RUN" ]; then
  OMP_NUM_THREADS=1 "$(dirname "$PY")/torchrun" --standalone --nproc_per_node=2 \
    -m pipemlaan.train --data.name=synthetic --data.synthetic_image=[3,16,16] \
    --data.synthetic_size=1024 --data.test_subset=256 --train.batch_size=32 \
    --train.epochs=3 --train.device=cpu --run.log_every=2 --run.progress=false \
    --run.dir="$WORK" --run.name=run > "$WORK/train.log" 2>&1 \
    || { echo "the training run failed: see $WORK/train.log" >&2; cat "$WORK/train.log" >&2; exit 1; }
  RUN=$WORK/run
fi
[ -d "$RUN/tensorboard" ] || { echo "$RUN has no tensorboard/ folder" >&2; exit 2; }

PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$TB" --logdir "$RUN/tensorboard" --host 127.0.0.1 --port "$PORT" > "$WORK/tb.log" 2>&1 &
TB_PID=$!
# up when its scalars route lists this run's tags (rank0, rank1, ...)
for _ in $(seq 60); do
  if curl -sf "http://127.0.0.1:$PORT/data/plugin/scalars/tags" 2>/dev/null | grep -q rank0; then
    break
  fi
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/data/plugin/scalars/tags" | grep -q "loss/module_" \
  || { echo "TensorBoard serves no loss scalars for $RUN (log: $WORK/tb.log)" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
# the old scalars dashboard, one chart per tag, grouped by section, a line per rank; virtual
# time lets its scripts draw the charts before the picture is taken
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1050 \
  --virtual-time-budget=20000 --screenshot="$WORK/shot.png" \
  "http://127.0.0.1:$PORT/?darkMode=false#scalars&tagFilter=loss%7Cimages_per_s%7Cwait_frac%7Ctest_top1" \
  > "$WORK/chromium.log" 2>&1 || true
[ -s "$WORK/shot.png" ] || { echo "chromium wrote no screenshot (log: $WORK/chromium.log)" >&2; exit 1; }
# a palette PNG: a dashboard has few colours, and the README's picture stays small
"$PY" -c "
import sys
from PIL import Image
Image.open(sys.argv[1]).convert('RGB').quantize(colors=64).save(sys.argv[2], optimize=True)
" "$WORK/shot.png" "$OUT"
echo "wrote $OUT ($(( $(stat -c %s "$OUT") / 1024 )) KiB) from $RUN"
