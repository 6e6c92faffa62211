import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")   # subprocess runs: OpenMP threads spin badly on a busy 2-core CI box

# torchvision 0.29 deprecates its image decoders (common.read_image falls back to PIL once they are gone)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
