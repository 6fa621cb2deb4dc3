"""HTTP peers of a test's own (webhook receivers, node endpoints): an aiohttp app on a free port."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    """Run `app` on a free port of `host`; returns its runner (`await runner.cleanup()` stops it) and port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    return runner, int(runner.addresses[0][1])
