"""Property tier (Hypothesis): over random small scenarios nothing is lost, nothing duplicated, bounds hold."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsim.model.scenario import Scenario
from capsim.sim.simulate import Simulation

HORIZON = 60.0


def _rollouts(draw: Any, continuous: bool = False) -> list[dict[str, Any]]:
    """Deploys in time order, some of broken templates (containers that exit within or past the cold start) or of
    slower or faster ones, of new images or not, with engine flags of their own (continuous batching), and undos
    after the first."""
    times = sorted(draw(st.lists(st.floats(0, HORIZON), max_size=3)))
    out: list[dict[str, Any]] = []
    for k, t in enumerate(times):
        if k and draw(st.booleans()):
            out.append({"at_s": t, "undo": True})
        else:
            out.append({"at_s": t, "crash_after_s": draw(st.one_of(st.none(), st.floats(0.5, 30))),
                        "slowdown": draw(st.sampled_from([1.0, 0.5, 3.0])), "new_image": draw(st.booleans())})
            if continuous and draw(st.booleans()):  # its vLLM arguments: a cap on the batch, a smaller KV cache
                out[-1]["batching"] = {"max_num_seqs": draw(st.integers(1, 16)),
                                       "num_blocks": draw(st.one_of(st.none(), st.integers(8, 400)))}
    if out and draw(st.booleans()):  # kubectl rollout pause, resumed (with the canary check or not) or never
        a = draw(st.floats(0, HORIZON))
        b = draw(st.one_of(st.none(), st.floats(a, HORIZON)))
        end = HORIZON if b is None else b
        out = [x for x in out if not (x.get("undo") and a <= x["at_s"] <= end)]  # kubectl refuses those
        out.append({"at_s": a, "pause": True})
        if b is not None:
            restarted = draw(st.booleans())
            p99 = draw(st.one_of(st.none(), st.floats(0.5, 3)))
            itl = draw(st.one_of(st.none(), st.floats(0.5, 3))) if continuous else None
            errors = draw(st.one_of(st.none(), st.floats(0.01, 1)))
            by = draw(st.one_of(st.none(), st.floats(0.01, 1)))  # points above the old pods' error rate
            counted = errors is not None or by is not None
            analysis = (p99 is not None or itl is not None or counted) and draw(st.booleans())
            out.append({"at_s": b, "resume": True, "undo_if_restarted": restarted,  # measured through the pause too
                        "restart_poll_s": draw(st.one_of(st.none(), st.floats(1, 120))) if restarted else None,
                        "undo_if_ttft_p99_over_baseline": p99, "undo_if_itl_mean_over_baseline": itl,
                        "undo_if_error_rate_over": errors, "undo_if_error_rate_over_baseline_by": by,
                        # the gateway's codes, or the pods' own servers' count (without refusals and resets)
                        "error_rate_source": draw(st.sampled_from(["gateway", "pod"])) if counted else "gateway",
                        "check_interval_s": draw(st.floats(1, 120)) if analysis else None,
                        "check_initial_delay_s": draw(st.floats(0, 60)) if analysis else 0.0,
                        "check_failure_limit": draw(st.integers(0, 3)) if analysis else 0})
        out.sort(key=lambda x: x["at_s"])
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    turns = draw(st.integers(1, 3))
    store = draw(st.sampled_from(["redis", "pod_local"]))
    router = draw(st.sampled_from(["random", "round_robin", "least_outstanding", "session_affinity"]))
    faults: dict[str, Any] = {
        "crashes": [{"at_s": draw(st.floats(0, HORIZON)), "pods": draw(st.integers(1, 2))}
                    for _ in range(draw(st.integers(0, 2)))],
        "redis_outages": [{"at_s": draw(st.floats(0, HORIZON)), "duration_s": draw(st.floats(0.1, 10))}
                          for _ in range(draw(st.integers(0, 1)))],
        # Prometheus down: the HPA holds, KEDA falls back or goes to zero
        "metrics_outages": [{"at_s": draw(st.floats(0, HORIZON)), "duration_s": draw(st.floats(1, 40))}
                            for _ in range(draw(st.integers(0, 1)))],
    }
    if draw(st.booleans()):
        faults["pod_mtbf_s"] = draw(st.floats(20, 200))
    # pods that run slow, their probes passing: drawn ones, pod 0, or the fleet for a spell
    faults["slow_pods"] = [{"at_s": draw(st.floats(0, HORIZON)), "factor": draw(st.floats(1, 5)),
                            "duration_s": draw(st.one_of(st.none(), st.floats(0.5, 30))),
                            **draw(st.sampled_from([{}, {"pods": 2}, {"pods": "all"}, {"pod": 0}]))}
                           for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):  # and at random, spell after spell
        faults["random_slowdowns"] = {"mtbf_s": draw(st.floats(5, 100)), "duration_s": draw(st.floats(0.5, 30)),
                                      "factor": draw(st.floats(1, 5))}
    continuous = draw(st.booleans())  # the pods batch per step (vLLM's scheduler), or batch by batch
    data: dict[str, Any] = {
        "horizon_s": HORIZON,
        "workload": {
            "arrivals": {"kind": "poisson", "rate_per_s": draw(st.floats(1, 40))},
            "output_tokens": {"kind": "lognormal", "mean": 20, "sigma": 0.5, "max": 100},
            # prompts of every size against a KV cache of 8 to 400 blocks: preemptions, and requests turned away
            **({"prompt_tokens": {"kind": "lognormal", "mean": draw(st.floats(20, 400)), "sigma": 0.6, "max": 2000}}
               if continuous else {}),
            "sessions": {"turns": turns, "think_time_s": draw(st.floats(0, 3))},
        },
        "service": {"kind": draw(st.sampled_from(["exponential", "deterministic"])),
                    "mean_s": draw(st.floats(0.01, 1.0))},
        "batching": ({"mode": "continuous", "max_num_seqs": draw(st.integers(1, 16)),
                      "max_num_batched_tokens": draw(st.integers(64, 512)), "num_blocks": draw(st.integers(8, 400)),
                      "queue_capacity": draw(st.integers(1, 50)), "overflow": draw(st.sampled_from(["reject", "wait"]))}
                     if continuous else
                     {"max_batch_size": draw(st.integers(1, 16)), "max_wait_ms": draw(st.floats(0, 200)),
                      "queue_capacity": draw(st.integers(1, 50)),
                      "overflow": draw(st.sampled_from(["reject", "wait"])),
                      "max_concurrent_batches": draw(st.integers(1, 3))}),
        "pods": {"replicas": draw(st.integers(1, 4)), "startup_s": draw(st.floats(0, 20)),
                 "image_pull_s": draw(st.sampled_from([0.0, 3.0])),
                 "termination_grace_s": draw(st.floats(0, 10)),
                 # deploys: rolling updates, one on top of another at times, under any strategy, or Recreate
                 "rollouts": _rollouts(draw, continuous),
                 **draw(st.sampled_from([{"rolling_update": {}},
                                         {"rolling_update": {"max_surge": 1, "max_unavailable": 0}},
                                         {"rolling_update": {"max_surge": 0, "max_unavailable": 1}},
                                         {"rolling_update": {"max_surge": "100%", "max_unavailable": "50%"}},
                                         {"strategy": "Recreate"}])),
                 "min_ready_s": draw(st.sampled_from([0, 5])),
                 "progress_deadline_s": draw(st.sampled_from([600, 5])),
                 "undo_on_deadline": draw(st.booleans()),
                 "undo_after_s": draw(st.one_of(st.none(), st.floats(1, 60)))},
        "router": {"kind": router},
        "faults": faults,
        "state": {"store": store},
        "client": {"timeout_s": draw(st.floats(0.2, 20)), "max_retries": draw(st.integers(0, 3)),
                   "backoff_s": draw(st.floats(0, 2))},
    }
    if draw(st.booleans()):  # GPU nodes, some of which die (the pods on them blackhole until evicted)
        data["cluster"] = {"max_gpus": 8, "node_gpus": draw(st.integers(1, 4)),
                           "node_provision_s": draw(st.floats(0, 20)),
                           "node_monitor_grace_s": draw(st.floats(0, 10)),
                           "unreachable_toleration_s": draw(st.floats(0, 20)),
                           "scale_down_unready_time_s": draw(st.floats(0, 30)),
                           # the node lifecycle controller: zones that stop evicting, every node NotReady
                           "other_nodes_per_zone": draw(st.integers(0, 2)),
                           "node_eviction_rate": draw(st.floats(0.05, 2)),
                           "large_cluster_size_threshold": draw(st.integers(0, 4)),
                           "node_auto_repair_s": draw(st.one_of(st.none(), st.floats(1, 30))),
                           "ok_total_unready_count": draw(st.integers(0, 3)),
                           "max_total_unready_percentage": draw(st.floats(0, 100))}
        faults["node_failures"] = [{"at_s": draw(st.floats(0, HORIZON)),
                                    "duration_s": draw(st.one_of(st.none(), st.floats(1, 40)))}
                                   for _ in range(draw(st.integers(0, 2)))]
        if draw(st.booleans()):
            faults["node_mtbf_s"] = draw(st.floats(10, 200))
        if draw(st.booleans()):  # spread over nodes (topology spread on the hostname), hard or soft
            soft = draw(st.booleans())
            data["pods"]["spread"] = {"max_skew": draw(st.integers(1, 2)),
                                      "when_unsatisfiable": "ScheduleAnyway" if soft else "DoNotSchedule",
                                      "min_nodes": None if soft else draw(st.one_of(st.none(), st.integers(1, 4)))}
        zones = data["cluster"]["zones"] = draw(st.integers(1, 3))
        if draw(st.booleans()):  # a zone's stock of GPUs: whole nodes of node_gpus within it
            data["cluster"]["max_gpus_per_zone"] = data["cluster"]["node_gpus"] * draw(st.integers(1, 2))
        if draw(st.booleans()):  # spot nodes, reclaimed on a schedule and at random
            data["cluster"]["spot"] = {"price_ratio": 0.5, "on_demand_nodes": draw(st.integers(0, 2)),
                                       "notice_s": draw(st.floats(0, 20)),
                                       "mtbf_s": draw(st.one_of(st.none(), st.floats(10, 200))),
                                       "drain": draw(st.sampled_from(["force", "eviction"]))}
            if draw(st.booleans()):  # a budget the eviction drain asks (and cluster-autoscaler's drains)
                data["pods"]["disruption_budget"] = {"max_unavailable": draw(st.integers(0, 2))}
            faults["spot_interruptions"] = [{"at_s": draw(st.floats(0, HORIZON)),
                                             "node": draw(st.one_of(st.none(), st.integers(0, 3)))}
                                            for _ in range(draw(st.integers(0, 2)))]
        if 8 // data["cluster"]["node_gpus"] >= zones:  # a node kept in each zone, or none
            data["cluster"]["min_nodes_per_zone"] = draw(st.integers(0, 1))
        if draw(st.booleans()):  # spread over zones, some of which go dark, hard or soft
            soft = draw(st.booleans())
            data["pods"]["zone_spread"] = {"max_skew": draw(st.integers(1, 2)),
                                           "when_unsatisfiable": "ScheduleAnyway" if soft else "DoNotSchedule",
                                           "min_zones": None if soft else draw(st.one_of(st.none(), st.integers(1, 3)))}
        faults["zone_failures"] = [{"at_s": draw(st.floats(0, HORIZON)), "zone": draw(st.integers(0, zones - 1)),
                                    "duration_s": draw(st.one_of(st.none(), st.floats(1, 40)))}
                                   for _ in range(draw(st.integers(0, 2)))]
        # no GPU node to be had for a while, and cluster-autoscaler's backoff of the groups that failed
        faults["gpu_stockouts"] = [{"at_s": draw(st.floats(0, HORIZON)),
                                    "duration_s": draw(st.one_of(st.none(), st.floats(1, 40))),
                                    "zone": draw(st.one_of(st.none(), st.integers(0, zones - 1)))}
                                   for _ in range(draw(st.integers(0, 2)))]
        backoff = draw(st.floats(0, 20))
        data["cluster"].update({"stockout_error_s": draw(st.one_of(st.none(), st.floats(0, 20))),
                                "max_node_provision_s": draw(st.floats(1, 40)),
                                "initial_node_group_backoff_s": backoff,
                                "max_node_group_backoff_s": backoff * draw(st.floats(1, 4))})
    if draw(st.booleans()):
        data["autoscaler"] = {
            "minReplicas": 1, "maxReplicas": draw(st.integers(1, 6)), "sync_period_s": 5,
            "scrape_interval_s": 5, "query_window_s": 15,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": draw(st.sampled_from(["capsim_queue_depth", "capsim_requests_in_flight",
                                                         "capsim_gpu_busy_ratio",
                                                         "capsim_time_to_first_token_seconds"]))},
                "target": {"type": "AverageValue", "averageValue": draw(st.sampled_from(["500m", "2", "5"]))}}}],
        }
        if draw(st.booleans()):  # KEDA on the gateway's counter, to zero and back
            data["autoscaler"].update({
                "minReplicas": 0, "keda": {"polling_interval_s": draw(st.integers(1, 10)),
                                           "cooldown_period_s": draw(st.integers(0, 30))},
                "metrics": [{"type": "External", "external": {
                    "metric": {"name": "capsim_gateway_requests_total"},
                    "target": {"type": "AverageValue", "averageValue": draw(st.sampled_from(["1", "5"]))}}}],
                "queries": {"capsim_gateway_requests_total": {"query": "rate", "window_s": 10}}})
            if draw(st.booleans()):  # replicas to hold while Prometheus is down (0: none, above max allowed)
                data["autoscaler"]["keda"]["fallback"] = {"failure_threshold": draw(st.integers(0, 3)),
                                                          "replicas": draw(st.integers(0, 8))}
    # a gateway that holds requests while no pod is ready
    data["router"]["hold_when_no_pod_s"] = draw(st.one_of(st.none(), st.floats(0.5, 30)))
    return Scenario.model_validate(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), seed=st.integers(0, 2**16))
def test_nothing_lost_nothing_duplicated(scenario: Scenario, seed: int) -> None:
    sim = Simulation(scenario, seed=seed)
    sim.client.count_answers = True  # as with a canary's error-rate check
    r = sim.run()  # raises InvariantError if the books do not balance
    df, s = r.requests, r.summary
    # the pods' own counts (a canary's error rate): every answer on one pod, every error at most once
    pods = sim.cluster.pods
    assert sum(p.answered for p in pods) == s.completed
    assert sum(p.errors for p in pods) <= int(df["attempts"].sum()) - s.completed
    assert all(0 <= p.refused <= p.errors for p in pods)  # the refusals and resets are among a pod's errors
    # every request that arrived has exactly one row
    assert df["request_id"].is_unique
    assert s.arrived == len(df) == s.completed + s.failed + s.timed_out + s.rejected + s.in_flight
    turns = scenario.workload.sessions.turns
    assert (df["session_id"] == df["request_id"] // turns).all()
    # a later turn only after the previous turn of its session was answered
    later = df[df["request_id"] % turns != 0].set_index("request_id")
    prev = df.set_index("request_id").reindex(later.index - 1)
    assert (prev["outcome"] == "ok").all()
    assert (later["arrival_s"].to_numpy() >= prev["end_s"].to_numpy()).all()
    # bounds
    assert df["attempts"].between(1, scenario.client.max_retries + 1).all()
    assert (df["arrival_s"] < HORIZON).all() and (df["end_s"].dropna() <= HORIZON + 1e-9).all()
    ok = df[df["outcome"] == "ok"]
    assert (ok["batch_size"] >= 1).all() and (ok["batch_size"] <= scenario.batching.max_batch_size).all()
    assert (ok["arrival_s"] <= ok["start_s"] + 1e-12).all() and (ok["first_token_s"] <= ok["end_s"]).all()
    assert (ok["pod"] >= 0).all()
    gave_up = df[df["outcome"] == "timed_out"]
    assert np.all(gave_up["end_s"] - gave_up["arrival_s"] >= scenario.client.timeout_s - 1e-9)
    assert df.loc[df["outcome"].isna(), "end_s"].isna().all()
    if scenario.state.store == "redis":
        assert s.lost_sessions == 0
    assert s.lost_sessions <= df["session_id"].nunique()
    # a node the cloud never created is never billed, nor ready; a slowdown slows
    nodes = r.nodes
    if len(nodes):
        never = nodes[nodes["unfulfilled"]]
        assert (never["gpu_hours"] == 0).all() and never["ready_s"].isna().all()
    assert (r.slowdowns["factor"] >= 1).all() and (r.slowdowns["end_s"] > r.slowdowns["start_s"]).all()
    # one row per rollout (and per undo the pipeline made at a progress deadline), each done or undone (if at all)
    # after it began
    ro = r.rollouts
    entries = scenario.pods.rollouts
    pauses = scenario.pods.pauses()
    auto = int(ro["undo"].sum()) - sum(x.undo for x in entries)  # the pipeline's undos
    assert auto >= 0 and (auto == 0 or scenario.pods.undo_on_deadline or scenario.pods.undo_after_s is not None
                          or any(x.undo_if_restarted or x.metrics_checked for x in entries))
    deploys = sum(x.action == "deploy" for x in entries)  # paused, a deploy waits (a later one replaces it)
    assert int((~ro["undo"]).sum()) == deploys if not pauses else int((~ro["undo"]).sum()) <= deploys
    # a restart poll that found a restart, or an analysis over its failure limit, resumed (and undid) early: the
    # pause ended there (an analysis with no initial delay measures at the pause itself, and fails: nothing answered);
    # no more measurements failed than were made, nor made than the pipeline's times
    early = ro["canary_checked_s"][ro["canary_failed"]]
    assert (ro["canary_failures"] <= ro["canary_measurements"]).all()
    assert ((ro["canary_failed_by"] != "") == ro["canary_failed"]).all()  # a failed check says what failed it
    times = scenario.pods.analysis_times()
    assert ro["canary_measurements"].sum() <= sum(len(times.get(i, [])) + 1 for i, x in enumerate(entries)
                                                  if x.metrics_checked)
    pauses = [(a, min([b, *(t for t in early if a <= t < b)])) for a, b in pauses]
    for a, b in pauses:  # nothing undone inside a pause, and only there is an undo refused
        assert not ((ro["at_s"][ro["undo"]] > a) & (ro["at_s"][ro["undo"]] < b)).any()
        assert not ((ro["at_s"][~ro["undo"]] > a) & (ro["at_s"][~ro["undo"]] < b)).any()  # nor anything begun
    refused = ro["undo_refused_s"].dropna()
    assert all(any(a <= t <= b for a, b in pauses) for t in refused)
    assert s.rollout_undos_refused >= len(refused)
    assert (ro["done_s"].dropna() >= ro["at_s"][ro["done_s"].notna()]).all()
    assert (ro["undone_s"].dropna() >= ro["at_s"][ro["undone_s"].notna()]).all()
    assert set(ro["at_s"][ro["undo"]]) <= {x.at_s for x in scenario.pods.rollouts if x.undo} | set(ro["undone_s"])
    stalled = ro["deadline_exceeded_s"].notna()  # reported no sooner than the deadline after the rollout began
    assert (ro["deadline_exceeded_s"][stalled] >= ro["at_s"][stalled] + scenario.pods.progress_deadline_s - 1e-9).all()
    if scenario.pods.strategy == "Recreate":  # every old pod goes first: no pod ready during any of its rollouts
        assert (ro["min_ready"] == 0).all()
