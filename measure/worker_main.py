"""Entry point of a worker process: ``python -m measure.worker_main FD``.

Receives ``(function_path, payload)`` on the connection at file descriptor FD, runs it and
sends back ``("ok", value)`` or ``("error", (summary, traceback))``; a crash simply ends the process.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from multiprocessing.connection import Connection


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(conn: Connection) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        path, payload = message
        try:
            reply = ("ok", _resolve(path)(payload))
        except BaseException as exc:  # report, stay alive for the next job
            summary = f"{type(exc).__name__}: {exc}".strip()
            reply = ("error", (summary, traceback.format_exc(limit=8)))
        conn.send(reply)


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
