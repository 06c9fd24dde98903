"""Gram statistics: collection hooks, the Gram file format, the `grams` command.

    regmean_fast.grams.collect_grams(model, batches=None, ...)   # hooks on nn.Linear / Conv1D
    regmean_fast.grams.load_grams(path) -> GramSet               # read a Gram file (docs/gram-format.md)
    regmean_fast.grams.save_grams(path, grams, counts, module_map, fingerprint, metadata, ...)
"""

from __future__ import annotations

from .fileformat import GramFileError, GramsError, GramSet, load_grams, save_grams

__all__ = ["GramsError", "GramFileError", "GramSet", "load_grams", "save_grams", "collect_grams", "GramCollector"]


def collect_grams(model, batches=None, **kwargs):
    """See regmean_fast.grams.collect.collect_grams (imported on first use)."""
    from .collect import collect_grams as _collect_grams

    return _collect_grams(model, batches, **kwargs)


def __getattr__(name):
    if name == "GramCollector":
        from . import collect

        return getattr(collect, name)
    raise AttributeError(name)
