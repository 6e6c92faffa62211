"""Test stand-in for ConMIM's utils.cosine_scheduler (its signature; the warmup includes its end point, as BEiT's)."""
import math
import os

import numpy as np

BREAK = os.environ.get("PARITY_STANDIN_BREAK", "")


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0,
                     warmup_steps=-1):
    total, warm = epochs * niter_per_ep, warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = [start_warmup_value + (base_value - start_warmup_value) * i / max(warm - 1, 1) for i in range(warm)]
    rest = [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / (total - warm)))
            for i in range(total - warm)]
    return np.array(warmup + rest) + (1e-6 if BREAK == "schedule" else 0.0)
