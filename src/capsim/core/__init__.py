"""The real serving core: batcher, reference engine, profiler, state store and metrics."""
