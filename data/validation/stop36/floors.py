import sys, time
from capsim.model.scenario import Scenario
from capsim.sim import simulate
path = sys.argv[1]
base = Scenario.from_yaml(path)
for floor in [int(x) for x in sys.argv[2].split(",")]:
    d = base.model_dump(by_alias=True); d["autoscaler"]["minReplicas"] = floor
    for kv in sys.argv[3:]:
        k, v = kv.split("="); cur = d; ks = k.split(".")
        for x in ks[:-1]: cur = cur[x]
        cur[ks[-1]] = type(cur[ks[-1]])(v) if cur[ks[-1]] is not None else v
    sc = Scenario.model_validate(d)
    t = time.process_time(); r = simulate(sc, seed=0); t = time.process_time() - t
    s = r.summary
    print(floor, f"p99 {s.ttft_p99_s:.3g} s p50 {s.ttft_p50_s:.3g}", f"itl p50 {s.itl_p50_s*1e3:.1f} ms", f"err {s.error_rate:.2%}",
          f"hit {s.prefix_hit_rate:.3f}", f"pods max {r.timeseries.ready_replicas.max()}", f"cost {s.cost:.1f}", f"n {len(r.requests)}", f"cpu {t:.1f}s", flush=True)
