"""The A/B's runs (ab.jsonl) by layout, heap freezing and rate: medians over the replications and the
worst replication, and the runs in which the generator saturated its core (a 0.5-s share of 0.95 or more).

    .venv/bin/python data/validation/loadgen-2026-12-02/summarize.py [ab.jsonl]
"""

import json
import sys
from pathlib import Path

import pandas as pd

path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("ab.jsonl")
runs = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
runs["saturated"] = runs.cpu_share_gen_pod.map(lambda s: any(g >= 0.95 for g, _ in s))
cols = ["way_in_mean_ms", "way_in_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "send_late_p99_ms",
        "generator_cpu_ms_per_request", "step_cycle_p999_ms"]
g = runs.groupby(["layout", "gc_freeze", "rate"])
table = g[cols].median().round(1)
table["worst_way_in_mean_ms"] = g.way_in_mean_ms.max().round(1)
table["runs"] = g.size()
table["generator_saturated"] = g.saturated.sum()
print(table.to_string())
