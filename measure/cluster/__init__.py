"""Measuring on a Ray cluster: builds as Ray tasks over every CPU of the cluster, one runner
actor per GPU and per measuring CPU host, each running every candidate in a worker process of
its own as ``LocalRunner`` does.

    address.py  what ``--cluster`` names, read without Ray
    remote.py   what runs on the nodes: the build task, the runner actor, pinning to cores
    pool.py     the driver's side: connect, place the runners, dispatch, outlive lost runners
    local_token.py  a new local cluster's token, in the environment rather than ~/.ray

Ray (the optional ``ray`` extra) is imported only by ``open_cluster``, never by importing this
package, so a job without a cluster never loads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .address import ClusterAddress, ClusterError, check_reachable, parse_cluster_address

if TYPE_CHECKING:
    from .pool import RayCluster


def open_cluster(address: str | ClusterAddress, build_timeout: float = 60.0, runner_cpus: int = 1,
                 note: Callable[[str], None] = lambda text: None, **remote) -> "RayCluster":
    """Connect to the Ray cluster at ``address`` (``ray`` or ``ray://HOST:PORT``); ClusterError
    (one line) when Ray is missing or the cluster cannot be reached."""
    if isinstance(address, str):
        try:
            address = parse_cluster_address(address)
        except ValueError as exc:
            raise ClusterError(str(exc)) from None
    try:
        from .pool import RayCluster
    except ImportError as exc:
        raise ClusterError(f"--cluster needs Ray: pip install 'llm-autotune[ray]' ({exc})") from None
    return RayCluster(address, build_timeout=build_timeout, runner_cpus=runner_cpus, note=note, **remote)


__all__ = ["ClusterAddress", "ClusterError", "check_reachable", "open_cluster", "parse_cluster_address"]
