"""Pod processes for the integration tests: the package's own helper (one implementation)."""

from capsim.studies.pods import PodProcess, free_port

__all__ = ["PodProcess", "free_port"]
