"""Studies over the simulator and the real core: validation (sim vs real), sweeps and tuning."""
