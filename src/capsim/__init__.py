"""capsim: plan the capacity of containerized AI agents with a measured core and a calibrated simulator."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
