"""The SimPy model of agent pods under load: arrivals, batching pods, router, HPA, cold starts, faults."""

from capsim.sim.simulate import InvariantError, SimResult, Simulation, simulate
from capsim.sim.summary import Summary

__all__ = ["InvariantError", "SimResult", "Simulation", "Summary", "simulate"]
