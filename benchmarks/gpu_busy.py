"""GPU busy fraction from a torch.profiler trace: the time at least one CUDA kernel runs, over
the wall time the trace spans (what "is the step GPU-bound?" asks).

  python -m benchmarks.gpu_busy runs/NAME/traces/rank0.json
  (write the trace with --run.profile_steps=[20,24] on a training run; the GPU check does)

Kernel events are those whose category is "kernel"; overlapping kernels (several streams)
count once. The wall time is from the first to the last event of any kind in the trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def busy_fraction(trace: dict) -> dict:
    events = [e for e in trace.get("traceEvents", []) if "ts" in e and "dur" in e]
    if not events:
        raise ValueError("the trace has no timed events")
    start = min(float(e["ts"]) for e in events)
    end = max(float(e["ts"]) + float(e["dur"]) for e in events)
    kernels = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                     if str(e.get("cat", "")).lower() == "kernel")
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in kernels:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    wall = end - start
    return {"kernels": len(kernels), "wall_us": wall, "busy_us": busy,
            "busy_fraction": busy / wall if wall > 0 else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_busy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", nargs="+")
    args = p.parse_args(argv)
    for path in args.trace:
        res = busy_fraction(json.loads(Path(path).read_text()))
        print(f"{path}: GPU busy {res['busy_fraction']:.1%} ({res['kernels']} kernels, "
              f"{res['busy_us'] / 1e3:.1f} of {res['wall_us'] / 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
