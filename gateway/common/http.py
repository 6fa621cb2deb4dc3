"""One HTTP behaviour for both services: roles per handler, one error body, strict parameters and JSON.

Every error answer is `{"error": code, "detail": text, ...}` with the status of its error class;
an unexpected exception is logged and answered 500 (a bug, never a client's fault). Handlers
declare the least role they need with `@requires(role)`; an undeclared handler needs admin.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from gateway.common.auth import Authenticator, role_allows
from gateway.common.errors import Conflict, EgizError, Invalid, NotFound
from gateway.common.names import is_loopback
from gateway.common.readings import loads_strict
from gateway.common.settings import HttpSection

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BASE_STATUS: dict[type[EgizError], int] = {NotFound: 404, Conflict: 409, Invalid: 400}


def requires(role: str | None) -> Callable[[Handler], Handler]:
    """Declare the least role a handler needs; `None` means public (it checks its caller itself)."""

    def mark(fn: Handler) -> Handler:
        target = getattr(fn, "__func__", fn)  # a bound method: mark its function
        setattr(target, "egiz_role", role)  # noqa: B010 (an attribute functions do not declare)
        return fn

    return mark


def error_body(status: int, error: str, detail: str, headers: Mapping[str, str] | None = None,
               **extra: Any) -> web.Response:
    """The one error answer of both services."""
    return web.json_response({"error": error, "detail": detail, **extra}, status=status,
                             headers=dict(headers) if headers else None)


class HttpMetrics(Protocol):
    """What the middleware counts: refused requests by status, requests by method and status, latency."""

    def refused(self, status: int) -> None: ...
    def observed(self, method: str, status: int, seconds: float) -> None: ...


def error_middleware(auth: Authenticator, metrics: HttpMetrics, *, service: str,
                     status_of: Mapping[type[EgizError], int] | None = None) -> Any:
    """Auth by declared role, JSON errors for everything, request metrics.

    `status_of` adds service-specific error classes to the base mapping (first match wins).
    """
    table = {**(status_of or {}), **BASE_STATUS}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            routing_error = getattr(request.match_info, "http_exception", None)
            if routing_error is not None:
                raise routing_error  # 404/405 need no key: they reveal nothing
            need = getattr(request.match_info.handler, "egiz_role", "admin")  # undeclared: strictest
            if need is not None:
                role = auth.role_for(request, allow_query_token=request.path.endswith("/ws"))
                if role is None:
                    status = 401
                    metrics.refused(401)
                    return error_body(401, "unauthorized", "a valid Bearer API key is required",
                                      headers={"WWW-Authenticate": 'Bearer realm="egiz"'})
                if not role_allows(role, need):
                    status = 403
                    metrics.refused(403)
                    return error_body(403, "forbidden", f"this needs the {need} role; the key has {role}")
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            if exc.status >= 400 and exc.content_type != "application/json":
                allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
                return error_body(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, headers=allow)
            raise
        except EgizError as exc:
            status = next((s for cls, s in table.items() if isinstance(exc, cls)), 500)
            if status == 500:
                log.error("unmapped error", extra={"path": request.path, "error": exc.code})
            extra: dict[str, Any] = {k: v for k, v in exc.fields.items() if k in ("version", "thing_id", "expected")}
            return error_body(status, exc.code, exc.detail, **extra)
        except Exception:
            log.exception("unhandled error", extra={"path": request.path, "method": request.method})
            return error_body(500, "internal", f"the {service} hit an unexpected error; it is logged")
        finally:
            metrics.observed(request.method, status, time.perf_counter() - start)

    return middleware


def known_params(query: Mapping[str, str], allowed: set[str]) -> None:
    """A 400 naming the query parameters a route does not take, so a misspelt filter is never ignored."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise Invalid(f"unknown parameter(s) {', '.join(unknown)[:200]}")


def int_param(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; absent or empty gives `default`, anything else a 400."""
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise Invalid(f"{name} must be an integer") from None
    if not lo <= n <= hi:
        raise Invalid(f"{name} must be between {lo} and {hi}")
    return n


async def read_json(request: web.Request, *, empty: Any = ...) -> Any:
    """The request body as strict JSON, or a 400 that says what is wrong.

    `empty`: what an absent body means (default: an absent body is a 400 too).
    """
    try:
        text = await request.text()
    except UnicodeDecodeError:
        raise Invalid("the body is not UTF-8") from None
    if empty is not ... and not text.strip():
        return empty
    return parse_json(text, "the body")


MAX_TEXT = 2000  # characters of an operator's note or reason


async def read_object(request: web.Request, allowed: frozenset[str], what: str, *, optional: bool = False,
                      texts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request body as a strict JSON object with only `allowed` keys, or a 400 naming the problem.

    `what` completes "the body must be an object with ...", e.g. "filter, limit, offset".
    `optional`: an absent body is an empty object rather than a 400.
    `texts`: keys whose values, where given, are strings of at most MAX_TEXT characters (notes, reasons).
    """
    body = await read_json(request, empty={} if optional else ...)
    if not isinstance(body, dict):
        raise Invalid(f"the body must be an object with {what}")
    extra = set(body) - allowed
    if extra:
        raise Invalid(f"unknown keys {sorted(extra)}")
    for key in texts:
        if key in body and (not isinstance(body[key], str) or len(body[key]) > MAX_TEXT):
            raise Invalid(f"{key} must be a string of at most {MAX_TEXT} characters")
    return body


async def read_anomaly_action(request: web.Request) -> tuple[str, bool]:
    """The body of an anomaly's acknowledge or resolve, on the gateway and the aggregator alike: an optional
    `note` and an optional `falsePositive` mark, returned as (note, false positive); no body means neither."""
    body = await read_object(request, frozenset({"note", "falsePositive"}), '"note" and "falsePositive"',
                             optional=True, texts=("note",))
    note, false_positive = body.get("note", ""), body.get("falsePositive", False)
    if not isinstance(false_positive, bool):
        raise Invalid("falsePositive must be true or false")
    return note, false_positive


def parse_json(text: str, what: str) -> Any:
    """JSON from a client, strictly: NaN, Infinity and deep nesting are an Invalid (400), never a 500."""
    try:
        return loads_strict(text)
    except RecursionError:
        raise Invalid(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a non-finite number, an integer of thousands of digits
        raise Invalid(f"{what} is not valid JSON: {str(exc)[:200]}") from None



async def serve(app: web.Application, http: HttpSection) -> tuple[web.AppRunner, int]:
    """Start serving `app` as `http` says (HTTPS when it names a certificate); returns the runner
    (clean it up to stop) and the port bound (`http.port` 0: any)."""
    from gateway.common.tls import server_context

    context = None
    if http.tls_cert_file:
        context = server_context(http.tls_cert_file, http.tls_key_file, http.tls_client_ca_file)
    elif not is_loopback(http.host):
        log.warning("serving plain HTTP on a network address: API keys and tokens cross it in clear; "
                    "set http.tls_cert_file and http.tls_key_file", extra={"host": http.host, "port": http.port})
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, http.host, http.port, reuse_address=True, ssl_context=context)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1] if sockets else http.port

