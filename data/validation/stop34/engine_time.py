"""Each calibration batch's engine time over the profile, by batch size and by the requests that arrived
while it ran, from a static validation's kept ``calibration_traces.json`` (stop 34: the repeated session ids).

    .venv/bin/python data/validation/stop34/engine_time.py RUN_DIR [RUN_DIR ...]

A trace row is (start, end, size, enqueue times, engine start, engine end) on the pod's monotonic clock; the
profile's batch time at each size is the calibration's points in ``provenance.json``. Printed per size: the
median engine time over the profile for the batches with ``a`` arrivals during them, and the median time
around the engine (the batch's wall less its engine time).
"""
from __future__ import annotations

import bisect
import collections
import json
import sys
from pathlib import Path

import numpy as np


def main(runs: list[str]) -> None:
    for run in runs:
        trace = json.loads((Path(run) / "calibration_traces.json").read_text())["calibration"]
        points = json.loads((Path(run) / "provenance.json").read_text())["calibration"]["points"]
        profile = {round(size): batch_s for size, batch_s, _ in points}
        enqueued = sorted(t for row in trace for t in row[3])
        by: dict[int, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        around: dict[int, list[float]] = collections.defaultdict(list)
        for start, end, size, _, e0, e1 in trace:
            arrivals = bisect.bisect_left(enqueued, end) - bisect.bisect_left(enqueued, start)
            by[int(size)][arrivals].append(e1 - e0)
            around[int(size)].append((end - start) - (e1 - e0))
        print(run)
        for size in sorted(by):
            if size not in profile:
                continue
            cells = "; ".join(f"{a} arriving: {np.median(v) / profile[size]:.2f} (x{len(v)})"
                              for a, v in sorted(by[size].items()))
            print(f"  size {size:2d}, profile {profile[size] * 1e3:5.1f} ms, around the engine "
                  f"{np.median(around[size]) * 1e3:.1f} ms; engine / profile: {cells}")


if __name__ == "__main__":
    main(sys.argv[1:])
