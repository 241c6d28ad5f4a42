"""Device profile (session 14): where a QZO NF4 step's time goes on CUDA, the 7B shape cut to LAYERS layers, batch BS.

Run from a checkout on the GPU machine: ``python3 profile_qzo.py nf4_fp16`` (a second argument: timings only).
Reformatted for ruff after the run; the same statements in the same order.
"""

import cProfile
import io
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
from benchmarks.zo_bench.scale import SCALE_SHAPES, _language_model_loss, _prepare_mode, timed  # noqa: E402
from benchmarks.zo_bench.scale_models import build_model  # noqa: E402

weights = sys.argv[1]
layers = int(os.environ.get("LAYERS", "8"))
device = torch.device("cuda", 0)
shape = dict(SCALE_SHAPES["7b"], num_hidden_layers=layers)
SCALE_SHAPES["7b_cut"] = shape
model = build_model(shape, weights, device=device)
loss_fn = _language_model_loss(model, {"shape": "7b_cut", "batch_size": int(os.environ.get("BS", "1"))}, device)
run_step, extra = _prepare_mode(model, "qzo", loss_fn)


def two_forwards():
    with torch.no_grad():
        loss_fn()
        loss_fn()


for _ in range(3):
    run_step()
    two_forwards()
steps = sorted(timed(run_step, device) for _ in range(5))
forwards = sorted(timed(two_forwards, device) for _ in range(5))
c0, w0 = time.process_time(), time.perf_counter()
run_step()
c1 = time.process_time()
torch.cuda.synchronize()
w1 = time.perf_counter()
c2, w2 = time.process_time(), time.perf_counter()
two_forwards()
c3 = time.process_time()
torch.cuda.synchronize()
w3 = time.perf_counter()
print(
    f"== {weights} layers={layers} step {steps[2] * 1e3:.1f} ms two forwards {forwards[2] * 1e3:.1f} ms ratio {steps[2] / forwards[2]:.3f}"
)
print(
    f"   host CPU: step {1e3 * (c1 - c0):.1f} ms (wall {1e3 * (w1 - w0):.1f}), two forwards {1e3 * (c3 - c2):.1f} ms (wall {1e3 * (w3 - w2):.1f})"
)
print("   peak", torch.cuda.max_memory_allocated() / 1e9, "GB")
if len(sys.argv) > 2:
    sys.exit(0)
profiler = cProfile.Profile()
profiler.enable()
run_step()
torch.cuda.synchronize()
profiler.disable()
text = io.StringIO()
pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
print(text.getvalue()[-6000:])
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run_step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
