#!/bin/bash
# The pictures in docs/img: a short run of each method's small32 preset (fewer epochs and steps) on
# 32x32 grey crops of scikit-image's bundled photos (benchmarks/learning.py's write_photos), one
# CPU thread. About 25 minutes on a 2-core CPU. Usage: bash benchmarks/pictures.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/pictures}
export OMP_NUM_THREADS=1
mkdir -p "$W"
python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
import learning; learning.write_photos(Path('$W/photos32'))"
DATA=$W/photos32/train

# the viz PNGs are small: enlarge SRC into DST by FACTOR with nearest-neighbour pixels
enlarge() {
    python -c "from PIL import Image; im = Image.open('$1'); \
im.resize(($3 * im.width, $3 * im.height), Image.NEAREST).save('$2')"
}

python conmim.py --preset small32 --data "$DATA" --epochs 6 --steps-per-epoch 30 --workers 0 \
    --viz-every 6 --out "$W/conmim" | tee "$W/conmim.txt"
enlarge "$W/conmim/viz_epoch5.png" docs/img/conmim_viz.png 3
python benchmarks/plot_log.py "$W/conmim" --out docs/img/conmim_loss.png \
    --title "conmim small32, photos 32x32, 180 steps"

python cim_correlate.py --preset small32 --data "$DATA" --epochs 6 --steps-per-epoch 20 \
    --workers 0 --viz-every 6 --out "$W/cim_correlate" | tee "$W/cim_correlate.txt"
enlarge "$W/cim_correlate/viz_epoch5.png" docs/img/cim_correlate_viz.png 4
python benchmarks/plot_log.py "$W/cim_correlate" --out docs/img/cim_correlate_loss.png \
    --title "cim_correlate small32, photos 32x32, 120 steps"

# the preset's dVAE first (4 full epochs, 372 steps), then 160 pre-training steps with it
python cim_corrupt.py --preset small32 --data "$DATA" --epochs 0 --workers 0 \
    --out "$W/cim_corrupt_tokenizer" | tee "$W/cim_corrupt_tokenizer.txt"
python cim_corrupt.py --preset small32 --data "$DATA" --epochs 4 --steps-per-epoch 40 --workers 0 \
    --train-tokenizer false --tokenizer "$W/cim_corrupt_tokenizer/tokenizer.pth" --viz-every 4 \
    --out "$W/cim_corrupt" | tee "$W/cim_corrupt.txt"
enlarge "$W/cim_corrupt/viz_epoch3.png" docs/img/cim_corrupt_viz.png 3
python benchmarks/plot_log.py "$W/cim_corrupt" --out docs/img/cim_corrupt_loss.png \
    --title "cim_corrupt small32, photos 32x32, 160 steps after the preset's 372-step dVAE"
