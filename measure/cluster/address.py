"""What ``--cluster`` names, read without importing Ray.

``ray`` is the Ray cluster this machine belongs to (``RAY_ADDRESS``, or one started here with
``ray start``), else a Ray instance started on this machine alone. ``ray://HOST:PORT`` is the
cluster whose head listens at HOST:PORT (``ray start --head --port PORT``); the driver must
run on one of its nodes, as Ray requires of a driver that connects by this address.
"""
from __future__ import annotations

import os
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


_HOST_PORT = r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})"
_ADDRESS = re.compile("ray://" + _HOST_PORT)


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


# An HTTP/2 client's connection preface and an empty SETTINGS frame: a Ray head's GCS (a gRPC
# server) answers with a SETTINGS frame of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4


def check_reachable(address: ClusterAddress, timeout_s: float = 5.0) -> None:
    """A head that does not answer fails here at once, not after Ray's retries; so does a
    port where something other than a Ray head listens (Ray would retry it for minutes).
    For ``ray`` the head is the one ``RAY_ADDRESS`` names, when it names one by HOST:PORT."""
    if address.host is None:
        named = re.fullmatch(_HOST_PORT, os.environ.get("RAY_ADDRESS", "").strip())
        if named is None:  # unset, "auto", "local": Ray finds or starts the cluster itself
            return
        address = ClusterAddress(named["host"].strip("[]"), int(named["port"]))
    tls = os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true")  # a TLS head wants a handshake first
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s) as conn:
            if tls:
                return
            conn.sendall(_H2_PREFACE)
            reply = b""
            while len(reply) < 9:  # one frame header: length (3), type, flags, stream (4)
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except UnicodeError:  # a name the resolver cannot encode ("a..b": an empty label)
        raise ClusterError(f"--cluster {address}: {address.host} is not a valid host name") from None
    except TimeoutError:
        raise ClusterError(f"no Ray cluster answers at {address.host}:{address.port}: "
                           f"no reply within {timeout_s:g} s") from None
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address.host}:{address.port}: "
                           f"{exc.strerror or exc}") from None
    if len(reply) < 9 or reply[3] != _H2_SETTINGS:
        raise ClusterError(f"{address.host}:{address.port} is not a Ray head: what listens there does not "
                           "speak its protocol (the head's port is the one `ray start --head --port` was given)")
