"""capsim: plan the capacity of containerized AI agents with a measured core and a calibrated simulator."""

from __future__ import annotations

__version__ = "0.1.0"

# the compiled scheduler and step-time modules, when a build matches their source (capsim.native)
from capsim.native import install as _install_native

_install_native()

__all__ = ["__version__"]
