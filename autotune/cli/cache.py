"""``autotune cache``: what the kernel cache holds, and clearing it (``measure.kernel_cache``)."""
from __future__ import annotations

import math

import click

from ..units import format_bytes
from .common import UserError, echo_json
from .group import cli


@cli.command()
@click.option("--clear", "clear_it", is_flag=True, help="remove the cached kernels (only the cache's own files)")
@click.option("--older-than", default=None, type=float, metavar="DAYS",
              help="with --clear: only kernels built more than DAYS days ago")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
def cache(clear_it, older_than, as_json) -> None:
    """Show the kernel cache (AUTOTUNE_CACHE_DIR, else ~/.cache/llm-autotune/kernels): kernels,
    files and bytes; --clear removes them. Clear while no tuning job runs."""
    from measure import default_cache_dir
    from measure.kernel_cache import clear, usage

    if older_than is not None and not clear_it:
        raise UserError("--older-than is for --clear")
    if older_than is not None and (not math.isfinite(older_than) or older_than <= 0):
        raise UserError(f"--older-than must be a number of days > 0, got {older_than}")
    folder = default_cache_dir()
    if clear_it:
        gone = clear(folder, None if older_than is None else older_than * 86400)
        left = usage(folder)
        if as_json:
            echo_json({"folder": str(folder), "removed": _figures(gone), "left": _figures(left)})
            return
        click.echo(f"{folder}: removed {gone.total_kernels} kernel(s), {gone.files} file(s), "
                   f"{format_bytes(gone.bytes)}; {left.total_kernels} kernel(s), {format_bytes(left.bytes)} left")
        return
    held = usage(folder)
    if as_json:
        echo_json({"folder": str(folder), **_figures(held)})
        return
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(held.kernels.items())) or "none"
    click.echo(f"{folder}: {held.total_kernels} kernel(s) ({kinds}), {held.files} file(s), {format_bytes(held.bytes)}")


def _figures(usage) -> dict:
    return {"kernels": usage.total_kernels, "by_kind": usage.kernels, "files": usage.files, "bytes": usage.bytes}
