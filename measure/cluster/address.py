"""What ``--cluster`` names, read without importing Ray.

``ray`` is the Ray cluster this machine belongs to (``RAY_ADDRESS``, or one started here with
``ray start``), else a Ray instance started on this machine alone. ``ray://HOST:PORT`` is the
cluster whose head listens at HOST:PORT (``ray start --head --port PORT``); the driver must
run on one of its nodes, as Ray requires of a driver that connects by this address.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass


class ClusterError(RuntimeError):
    """The cluster cannot be used as asked (unreachable, no runner fits, every runner gone):
    one line for the user."""


@dataclass(frozen=True)
class ClusterAddress:
    host: str | None = None  # None: this machine's cluster, or a new local one
    port: int | None = None

    @property
    def ray_address(self) -> str | None:
        """What ``ray.init(address=...)`` takes."""
        if self.host is None:
            return None
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"ray://{self.ray_address}" if self.host else "ray"


_ADDRESS = re.compile(r"ray://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})")


def parse_cluster_address(text: str) -> ClusterAddress:
    """``ray`` or ``ray://HOST:PORT``; ValueError (one line) for anything else."""
    text = (text or "").strip()
    if text == "ray":
        return ClusterAddress()
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(f"malformed --cluster {text!r}: expected ray or ray://HOST:PORT like ray://10.0.0.1:6379")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"--cluster {text}: port {port} is not between 1 and 65535")
    return ClusterAddress(match["host"].strip("[]"), port)


def check_reachable(address: ClusterAddress, timeout_s: float = 5.0) -> None:
    """A head that does not answer fails here at once, not after Ray's retries."""
    if address.host is None:
        return
    try:
        socket.create_connection((address.host, address.port), timeout=timeout_s).close()
    except UnicodeError:  # a name the resolver cannot encode ("a..b": an empty label)
        raise ClusterError(f"--cluster {address}: {address.host} is not a valid host name") from None
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address.host}:{address.port}: "
                           f"{exc.strerror or exc}") from None
