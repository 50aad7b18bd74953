"""Pure decisions shared by the real core and the simulator: batching and autoscaling."""
