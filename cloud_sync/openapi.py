"""The OpenAPI 3.1 document of the aggregator API, served at `/api/v1/openapi.json`."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.common.alarms import PARAMETERS as JOURNAL_PARAMETERS
from gateway.common.openapi import BEARER, ERROR_SCHEMA, operation, response

ERROR = {"$ref": "#/components/schemas/Error"}
REFUSAL = {"$ref": "#/components/schemas/Refusal"}
ANY = {"type": "object"}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "example": "izmir-bakery:oven-001"}
ANOMALY_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
ERRORS = {"400": response("invalid request", ERROR), "401": response("no valid API key", ERROR),
          "403": response("the key's role is too low", ERROR)}
MISSING = {"404": response("not found", ERROR)}
GATEWAY = {"401": response("no valid gateway token", ERROR)}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        out["description"] = description
    return out


def _items(item: dict[str, Any], paged: bool = False) -> dict[str, Any]:
    props: dict[str, Any] = {"items": {"type": "array", "items": item}}
    if paged:
        props |= {"total": {"type": "integer"}, "limit": {"type": "integer"}, "offset": {"type": "integer"}}
    return {"type": "object", "required": ["items"], "properties": props}


PAGE_PARAMS = [_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
               _query("offset", {"type": "integer", "minimum": 0, "default": 0})]
OEE_SCOPE = [_query("scope", {"enum": ["machine", "line", "site", "all"]}, "default all"),
             _query("id", {"type": "string"}, "a Thing, site/line or site"),
             _query("from", {"type": "string"}, "ISO 8601 or epoch seconds; default to - 24 h"),
             _query("to", {"type": "string"}, "ISO 8601 or epoch seconds; default now")]
ACTION_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False,
    "properties": {"note": {"type": "string"}, "falsePositive": {"type": "boolean"}}}}}}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "OpenEgiz Edge aggregator API", "version": __version__,
             "description": "Gateways write with their gateway token; people read with API keys (docs/aggregator.md)."},
    "components": {
        "securitySchemes": BEARER,
        "schemas": {
            "Error": ERROR_SCHEMA,
            "Refusal": {"type": "object", "required": ["error", "detail", "thingIds", "anomalyIds"], "properties": {
                "error": {"type": "string"}, "detail": {"type": "string"},
                "thingIds": {"type": "array", "items": {"type": "string"}},
                "anomalyIds": {"type": "array", "items": {"type": "string"}}}},
            "Thing": {"type": "object", "required": ["id", "site", "line", "gatewayId"], "properties": {
                "id": {"type": "string"}, "site": {"type": "string"}, "line": {"type": "string"},
                "gatewayId": {"type": "string"}}},
            "Anomaly": {"type": "object", "required": ["id", "thingId", "state", "site", "line", "gatewayId",
                                                       "pending"], "properties": {
                "id": {"type": "string"}, "thingId": {"type": "string"},
                "state": {"enum": ["open", "acknowledged", "resolved"]}, "site": {"type": "string"},
                "line": {"type": "string"}, "gatewayId": {"type": "string"},
                "pending": {"type": "array", "items": {"enum": ["ack", "resolve"]}},
                "journal": {"type": "array", "items": {"type": "object", "required": ["at", "action", "by"],
                                                       "properties": {
                    "at": {"type": "string"}, "action": {"enum": ["acknowledged", "resolved", "shelved", "unshelved"]},
                    "by": {"type": "string"}, "comment": {"type": "string"}}}},
                "shelved": {"type": ["object", "null"], "properties": {
                    "id": {"type": "string"}, "since": {"type": "string"}, "until": {"type": "string"},
                    "by": {"type": "string"}, "reason": {"type": "string"}}}}},
            "Owner": {"type": "object", "required": ["thingId", "gatewayId"], "properties": {
                "thingId": {"type": "string"}, "gatewayId": {"type": "string"},
                "formerGatewayId": {"type": "string"}}},
        },
    },
    "paths": {
        "/api/v1/ingest/batches": {"post": operation(
            "One uplink batch (gateway token): applied once, in order, whole (docs/sync.md)", None,
            {"200": response("applied or duplicate", {"type": "object", "required": ["status"], "properties": {
                "status": {"enum": ["applied", "duplicate"]}, "batch_seq": {"type": "integer"},
                "points": {"type": "integer"}, "actions": {"type": "array", "items": ANY}}}),
             "400": response("refused whole, naming the Things at fault", REFUSAL), **GATEWAY,
             "403": response("not this gateway's: forbidden, or foreign_thing naming them", ERROR),
             "409": response("out of order: the expected batch_seq", ERROR),
             "413": response("larger than aggregator.max_batch_mb"),
             "503": response("busy or the store failed; retry (Retry-After)", ERROR)},
            security=[{"bearer": []}],
            requestBody={"required": True, "content": {
                "application/vnd.apache.arrow.stream": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})},
        "/api/v1/ingest/actions": {"get": operation(
            "Operators' actions waiting for the calling gateway (gateway token)", None,
            {"200": response("actions", {"type": "object", "required": ["actions"],
                                         "properties": {"actions": {"type": "array", "items": ANY}}}), **GATEWAY},
            security=[{"bearer": []}])},
        "/api/v1/sites": {"get": operation("Every site with its lines and health", "viewer",
                                           {"200": response("sites", _items(ANY)), **ERRORS})},
        "/api/v1/gateways": {"get": operation("Every gateway: last batch, backlog, lag, clock offset", "viewer",
                                              {"200": response("gateways", _items(ANY)), **ERRORS})},
        "/api/v1/things": {"get": operation(
            "Things across sites", "viewer",
            {"200": response("a page", _items({"$ref": "#/components/schemas/Thing"}, paged=True)), **ERRORS},
            parameters=[_query("site", {"type": "string"}), _query("line", {"type": "string"}),
                        _query("type", {"type": "string"}), *PAGE_PARAMS])},
        "/api/v1/things/{id}": {"get": operation(
            "One Thing", "viewer", {"200": response("the Thing", {"$ref": "#/components/schemas/Thing"}),
                                   **ERRORS, **MISSING}, parameters=[ID])},
        "/api/v1/things/{id}/history": {"get": operation(
            "History across sites, in the gateway's format (docs/api.md, 'History')", "viewer",
            {"200": {"description": "unified history document, or CSV with format=csv",
                     "content": {"application/json": {"schema": ANY}, "text/csv": {"schema": {"type": "string"}}}},
             **ERRORS, **MISSING},
            parameters=[ID, _query("from", {"type": "string"}), _query("to", {"type": "string"}),
                        _query("feature", {"type": "string"}), _query("property", {"type": "string"}),
                        _query("resolution", {"type": "string"}), _query("format", {"enum": ["json", "csv"]}),
                        _query("limit", {"type": "integer"})])},
        "/api/v1/things/{id}/owner": {
            "get": operation("The gateway that owns a Thing", "viewer",
                             {"200": response("the owner", {"$ref": "#/components/schemas/Owner"}),
                              **ERRORS, **MISSING}, parameters=[ID]),
            "put": operation("Give a Thing to another gateway of its site (the machine moved lines)", "admin",
                             {"200": response("transferred", {"$ref": "#/components/schemas/Owner"}),
                              **ERRORS, **MISSING}, parameters=[ID],
                             requestBody={"required": True, "content": {"application/json": {"schema": {
                                 "type": "object", "required": ["gateway"], "additionalProperties": False,
                                 "properties": {"gateway": {"type": "string"}}}}}}),
        },
        "/api/v1/critical": {"get": operation("The ten most critical assets", "viewer",
                                              {"200": response("assets", _items(ANY)), **ERRORS},
                                              parameters=[_query("site", {"type": "string"})])},
        "/api/v1/models": {"get": operation("The model registry: versions per type", "viewer",
                                            {"200": response("types", {"type": "object", "required": ["types"],
                                                                       "properties": {"types": {"type": "array"}}}),
                                             **ERRORS})},
        "/api/v1/models/active": {"get": operation(
            "What gateways fetch: the active version of each type, its files' SHA-256 and the aggregator's "
            "Ed25519 signature over them (gateway token or API key)", None,
            {"200": response("active models", {"type": "object", "required": ["models"],
                                               "properties": {"models": ANY}}), **GATEWAY},
            security=[{"bearer": []}])},
        "/api/v1/models/{type}/{version}/{file}": {"get": operation(
            "One file of a model version (gateway token or API key)", None,
            {"200": {"description": "the file", "content": {"application/octet-stream": {"schema": {
                "type": "string", "format": "binary"}}}}, **GATEWAY, **MISSING},
            security=[{"bearer": []}],
            parameters=[{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                        for n in ("type", "version", "file")])},
        "/api/v1/anomalies": {"get": operation(
            "The alarm journal across sites, newest first (docs/aggregator.md, 'Alarm journal')", "viewer",
            {"200": {"description": "a page, or CSV with format=csv", "content": {
                "application/json": {"schema": _items({"$ref": "#/components/schemas/Anomaly"}, paged=True)},
                "text/csv": {"schema": {"type": "string"}}}}, **ERRORS},
            parameters=[_query(n, {"type": "string"}, d) for n, d in JOURNAL_PARAMETERS])},
        "/api/v1/anomalies/{id}": {"get": operation(
            "One anomaly", "viewer", {"200": response("the anomaly", {"$ref": "#/components/schemas/Anomaly"}),
                                     **ERRORS, **MISSING}, parameters=[ANOMALY_ID])},
        **{f"/api/v1/anomalies/{{id}}/{act}": {"post": operation(
            f"{act.capitalize()} an anomaly centrally: queued for its gateway", "operator",
            {"202": response("queued", {"$ref": "#/components/schemas/Anomaly"}), **ERRORS, **MISSING,
             "409": response("already resolved", ERROR)}, parameters=[ANOMALY_ID], requestBody=ACTION_BODY)}
           for act in ("ack", "resolve")},
        "/api/v1/oee": {"get": operation(
            "OEE with availability, performance and quality of a machine, line, site or every site (docs/oee.md)",
            "viewer", {"200": response("figures per shift, hour or day", ANY), **ERRORS},
            parameters=[*OEE_SCOPE, _query("by", {"enum": ["shift", "hour", "day", "none"]})])},
        "/api/v1/downtime": {"get": operation(
            "The six big losses and the stops of planned time by reason (a Pareto)", "viewer",
            {"200": response("losses and Pareto", ANY), **ERRORS},
            parameters=[*OEE_SCOPE, _query("state", {"type": "string"}, "stop states, comma-separated"),
                        _query("microstopS", {"type": "number"}, "stops shorter than this are minor stops")])},
        "/api/v1/oee/events": {"get": operation(
            "Machine state events overlapping the range, oldest first (the state bands)", "viewer",
            {"200": response("events", _items(ANY)), **ERRORS},
            parameters=[*OEE_SCOPE, _query("state", {"type": "string"}, "comma-separated"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 50000, "default": 5000})])},
        "/api/v1/ws": {"get": operation(
            "WebSocket: SiteSummaries, Anomaly and Things events (docs/aggregator.md)", "viewer",
            {"101": response("switching protocols"), **ERRORS,
             "503": response("aggregator.ws_max_clients reached", ERROR)})},
        "/api/v1/layout": {"get": operation("Floor layouts of every line", "viewer",
                                            {"200": response("layout", ANY), **ERRORS})},
        "/": {"get": operation("Redirects to the web viewer", None, {"302": response("to /viewer/")})},
        "/viewer/{path}": {"get": operation(
            "The web viewer's static files", None, {"200": response("a file"), "404": response("no such file")},
            parameters=[{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/health": {"get": operation("Liveness", None, {"200": response("alive", ANY)})},
        "/ready": {"get": operation("Readiness: the store answers (with warnings)", None,
                                    {"200": response("ready", ANY), "503": response("not ready", ANY)})},
        "/metrics": {"get": operation("Prometheus metrics", None, {"200": {
            "description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})},
        "/api/v1/openapi.json": {"get": operation("This document", None, {"200": response("OpenAPI 3.1", ANY)})},
    },
}
