"""matplotlib figures from capsim's own frames, shared by the notebooks, the demo and the studies.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (so it is safe on headless
machines and in threads); ``save(fig, path)`` writes a PNG. In a notebook, run ``%matplotlib inline``
once and leave the figure as a cell's last expression.
"""

from capsim.plots.common import pareto_mask, save
from capsim.plots.profiles import batching_speedup, compare_profiles, profile_curves
from capsim.plots.runs import latency_cdfs, run_timeline, ttft_p99_over_time
from capsim.plots.sessions import crash_ttft, imbalance, pod_load, router_bars, ttft_around
from capsim.plots.studies import cost_vs_ttft, front_rows, pod_shapes, sim_vs_real

__all__ = [
    "batching_speedup",
    "compare_profiles",
    "cost_vs_ttft",
    "crash_ttft",
    "front_rows",
    "imbalance",
    "latency_cdfs",
    "pareto_mask",
    "pod_load",
    "pod_shapes",
    "profile_curves",
    "router_bars",
    "run_timeline",
    "save",
    "sim_vs_real",
    "ttft_around",
    "ttft_p99_over_time",
]
