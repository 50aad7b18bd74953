"""The shared data model: frozen, validated settings and records with no I/O beyond file loading."""

from capsim.model.settings import BatchSettings

__all__ = ["BatchSettings"]
