"""From tuning records to kernels a program runs: the exported library and kernels compiled
from logs on first use.

``export_library(records, "lib/")`` renders, compiles, links and checks the best verified
kernel of every task into a directory that ``runtime.load`` opens with numpy only.
``TunedKernels.from_logs([...])`` serves the same kernels straight from tuning logs,
compiling each on first use; ``TunedKernels.defaults()`` serves template defaults (the
untuned baseline, and the fallback of a library for shapes it lacks).

This package sits above ``runtime``, ``search_space``, ``measure`` and ``records`` and uses
all of them; nothing below it imports it.
"""
from __future__ import annotations

from .library_writer import ExportError, ExportFailed, ExportSummary, export_library
from .tuned_kernels import TunedKernels

__all__ = ["ExportError", "ExportFailed", "ExportSummary", "TunedKernels", "export_library"]
