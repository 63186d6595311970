"""Start-up in the order a platform expects: bind the port first, answer liveness at once, load and compile
behind it, then serve.

`bind` takes the port before anything is loaded, so a port in use fails in a second, not after the load.
`Starting` is the ASGI app uvicorn serves from that moment: while `load` (on a worker thread) opens the index
and the export and builds the service's app, and that app's own lifespan compiles every shape, `/healthz`
answers 200 (`"ready": false`), `/readyz` 503 with the stage, and any other route 503 with `Retry-After`;
then every request goes to the service's app. A failed load is printed and stops the server, and `failure`
holds it for the caller to raise.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from starlette.responses import JSONResponse

from notellm_jax.errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; ConfigError at once if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot bind {host}:{port}: {e.strerror} (another server on that port? choose "
                          "another with --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Starting:
    """ASGI app: liveness and readiness while `load(report)` builds the service's app (`report(stage)` names
    what it is doing), then that app. `on_failure` is called (e.g. to stop uvicorn) if loading fails."""

    def __init__(self, load: Callable[[Callable[[str], None]], object], on_failure: Callable[[], None] = lambda: None):
        self.load, self.on_failure = load, on_failure
        self.app = None
        self.stage = "starting"
        self.failure: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._lifespan = None

    def report(self, stage: str) -> None:
        self.stage = stage
        print(f"[serve] {stage}", flush=True)

    async def _start(self) -> None:
        try:
            app = await asyncio.to_thread(self.load, self.report)
            self.report("compiling every shape (the JAX compilation cache makes a restart fast)")
            self._lifespan = app.router.lifespan_context(app)
            await self._lifespan.__aenter__()
        except Exception as e:  # noqa: BLE001  (reported, and the server stops with it)
            self.failure = e
            self.report(f"start-up failed ({type(e).__name__}); the server stops")  # the caller raises it
            self.on_failure()
            return
        self.app = app
        self.report("ready")

    async def _run_lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._task = asyncio.get_running_loop().create_task(self._start())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._task is not None and not self._task.done():
                    self._task.cancel()
                    await asyncio.gather(self._task, return_exceptions=True)
                if self._lifespan is not None and self.app is not None:
                    await self._lifespan.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._run_lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            response = JSONResponse({"status": "ok", "ready": False, "stage": self.stage})
        else:
            what = "/readyz" if scope["path"] == "/readyz" else "the service"
            response = JSONResponse({"ready": False, "detail": f"{what}: not ready, {self.stage}"}, 503,
                                    headers={"Retry-After": "5"})
        await response(scope, receive, send)
