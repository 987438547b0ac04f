"""The uvicorn server that runs `ServerApp`, with the one change its shutdown needs."""

from __future__ import annotations

import socket

import uvicorn

from electric_agents.http.app import ServerApp


class AppServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: ServerApp) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn first closes the listener, then waits for open responses (up to
        # `timeout_graceful_shutdown`), then runs the app's lifespan shutdown. Live reads
        # would hold it that long, and the mock agent's callbacks would find no listener,
        # so both are dealt with before.
        await self._app.begin_stopping()
        await super().shutdown(sockets)
