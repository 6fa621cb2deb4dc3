"""The OpenAPI 3.1 document of the gateway API, served at `/api/v1/openapi.json`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.common.alarms import PARAMETERS as JOURNAL_PARAMETERS
from gateway.common.http import requires
from gateway.common.openapi import operation, response

ERROR = {"$ref": "#/components/schemas/Error"}
THING = {"$ref": "#/components/schemas/Thing"}
PAGE = {"$ref": "#/components/schemas/ThingPage"}


_resp = response


ERRORS = {
    "400": _resp("invalid request", ERROR),
    "401": _resp("no valid API key", ERROR),
    "403": _resp("the key's role is too low", ERROR),
    "404": _resp("no such Thing or feature", ERROR),
}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "example": "izmir-bakery:oven-001"}
FEATURE = {"name": "feature", "in": "path", "required": True, "schema": {"type": "string"}}
TYPE = {"name": "type", "in": "path", "required": True, "schema": {"type": "string"}, "example": "oven"}
IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
            "description": 'the version the write is based on, e.g. "7"; a stale one gives 409'}
HELD_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "a held Thing id or anomaly id", "example": "izmir-bakery:oven-001"}
CONFLICT = {"409": _resp("version conflict or id exists", ERROR)}
DEVICE = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}, "example": "oven-plc"}


_op = operation


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "OpenEgiz Edge gateway API", "version": __version__},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "API key; roles viewer < operator < admin"}},
        "schemas": {
            "Held": {"type": "object", "required": ["id", "kind", "reason", "since", "state", "points"],
                     "properties": {"id": {"type": "string"}, "kind": {"enum": ["thing", "anomaly"]},
                                    "reason": {"type": "string"}, "since": {"type": "number"},
                                    "state": {"enum": ["held", "resend", "dropped"]},
                                    "points": {"type": "integer"}, "ranges": {"type": "integer"}}},
            "Error": {"type": "object", "required": ["error", "detail"],
                      "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}},
            "ConnectorDevice": {"type": "object", "required": ["protocol", "name", "url", "thing", "tags"],
                                "properties": {"protocol": {"type": "string", "enum": ["modbus", "opcua", "s7"]},
                                               "name": {"type": "string"}, "url": {"type": "string"},
                                               "thing": {"type": "string"}, "type": {"type": "string"},
                                               "poll_s": {"type": "number"},
                                               "tags": {"type": "array", "items": {"type": "object"}}}},
            "Feature": {"type": "object", "properties": {
                "properties": {"type": "object"}, "desiredProperties": {"type": "object"}}},
            "Thing": {"type": "object", "required": ["id", "type"], "properties": {
                "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]*:[A-Za-z0-9][A-Za-z0-9._-]*$"},
                "type": {"type": "string"},
                "metadata": {"type": "object"},
                "features": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Feature"}},
                "relationships": {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"}, "targetId": {"type": "string"}}}},
                "version": {"type": "integer"},
                "lastUpdated": {"type": "string", "format": "date-time"}}},
            "ThingPage": {"type": "object", "properties": {
                "items": {"type": "array", "items": THING}, "total": {"type": "integer"},
                "limit": {"type": "integer"}, "offset": {"type": "integer"},
                "nextOffset": {"type": ["integer", "null"]}}},
            "Query": {"type": "object", "properties": {
                "filter": {"type": "object", "description": "see docs/api.md, 'Filters'"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                "offset": {"type": "integer", "minimum": 0}}},
        },
    },
    "paths": {
        "/api/v1/things": {
            "get": _op("List Things (paginated, filtered)", "viewer", {"200": _resp("a page", PAGE), **ERRORS},
                       parameters=[
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100}},
                           {"name": "offset", "in": "query", "schema": {"type": "integer", "default": 0}},
                           {"name": "type", "in": "query", "schema": {"type": "string"}},
                           {"name": "filter", "in": "query", "schema": {"type": "string"},
                            "description": "a filter object as JSON"}]),
            "post": _op("Create a Thing", "admin", {"201": _resp("created", THING), **ERRORS, **CONFLICT},
                        requestBody={"required": True, "content": {"application/json": {"schema": THING}}}),
        },
        "/api/v1/things/{id}": {
            "get": _op("Get a Thing", "viewer", {"200": _resp("the Thing", THING), **ERRORS}, parameters=[ID]),
            "put": _op("Replace metadata, features and relationships", "admin",
                       {"200": _resp("replaced", THING), **ERRORS, **CONFLICT}, parameters=[ID, IF_MATCH],
                       requestBody={"required": True, "content": {"application/json": {"schema": THING}}}),
            "delete": _op("Delete a Thing", "admin", {"204": _resp("deleted"), **ERRORS, **CONFLICT},
                          parameters=[ID, IF_MATCH]),
        },
        "/api/v1/things/{id}/features/{feature}": {
            "get": _op("Get one feature", "viewer",
                       {"200": _resp("the feature", {"$ref": "#/components/schemas/Feature"}), **ERRORS},
                       parameters=[ID, FEATURE]),
            "put": _op("Merge properties / desiredProperties into a feature (RFC 7386); desired ones are "
                       "sent to the node as a command, or written to the tags of a PLC-connected Thing", "operator",
                       {"200": _resp("merged"), **ERRORS, **CONFLICT,
                        "422": _resp("a PLC tag refused the write (read-only, unknown, out of range)", ERROR),
                        "503": _resp("broker or PLC device unavailable for the command", ERROR)},
                       parameters=[ID, FEATURE, IF_MATCH],
                       requestBody={"required": True, "content": {"application/json": {"schema": {
                           "type": "object", "properties": {"properties": {"type": "object"},
                                                            "desiredProperties": {"type": "object"},
                                                            "version": {"type": "integer"}}}}}}),
        },
        "/api/v1/things/{id}/history": {
            "get": _op("Stored history of one Thing: raw points or min/max/avg/count/last buckets (docs/api.md, "
                       "'History')", "viewer",
                       {"200": {"description": "unified history document, or CSV with format=csv",
                                "content": {"application/json": {"schema": {"type": "object"}},
                                            "text/csv": {"schema": {"type": "string"}}}}, **ERRORS},
                       parameters=[ID,
                                   {"name": "from", "in": "query", "schema": {"type": "string"},
                                    "description": "ISO 8601 or epoch seconds; default: one hour before `to`"},
                                   {"name": "to", "in": "query", "schema": {"type": "string"},
                                    "description": "ISO 8601 or epoch seconds; default: now"},
                                   {"name": "feature", "in": "query", "schema": {"type": "string"}},
                                   {"name": "property", "in": "query", "schema": {"type": "string"},
                                    "description": "a flattened path (voltage.a) or its base name (voltage)"},
                                   {"name": "resolution", "in": "query",
                                    "schema": {"type": "string", "default": "auto"},
                                    "description": "raw, auto, or a bucket such as 10s, 1m, 1h, 1d"},
                                   {"name": "format", "in": "query",
                                    "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"}},
                                   {"name": "batch_id", "in": "query", "schema": {"type": "string"},
                                    "description": "only times when the Thing carried this value; any key of "
                                                   "buffer.context_keys works the same way"}]),
        },
        "/api/v1/anomalies": {
            "get": _op("Anomalies, newest first (docs/api.md, 'Anomalies')", "viewer",
                       {"200": _resp("a page of anomalies"), **ERRORS},
                       parameters=[{"name": n, "in": "query", "schema": {"type": "string"}, "description": d}
                                   for n, d in JOURNAL_PARAMETERS]),
        },
        "/api/v1/anomalies/{id}": {"get": _op("One anomaly", "viewer", {"200": _resp("the anomaly"), **ERRORS},
                                               parameters=[ID])},
        "/api/v1/anomalies/{id}/ack": {
            "post": _op("Acknowledge: someone investigates", "operator",
                        {"200": _resp("the anomaly"), **ERRORS, **CONFLICT}, parameters=[ID]),
        },
        "/api/v1/anomalies/{id}/resolve": {
            "post": _op("Resolve, optionally as a false positive (kept for retraining)", "operator",
                        {"200": _resp("the anomaly"), **ERRORS}, parameters=[ID]),
        },
        "/api/v1/things/{id}/rul": {
            "get": _op("Remaining useful life per health indicator, with an uncertainty band", "viewer",
                       {"200": _resp("estimates"), **ERRORS}, parameters=[ID]),
        },
        "/api/v1/models": {"get": _op("Model versions per equipment type and the one in use", "viewer",
                                      {"200": _resp("models"), **ERRORS})},
        "/api/v1/models/{type}/activate": {
            "post": _op("Check a version and use it now; refused (422) when corrupt or mismatched", "admin",
                        {"200": _resp("activated"), "422": _resp("refused", ERROR), **ERRORS},
                        parameters=[TYPE]),
        },
        "/api/v1/models/{type}/rollback": {
            "post": _op("Back to the previous version", "admin", {"200": _resp("rolled back"),
                                                                 "422": _resp("nothing to roll back to", ERROR),
                                                                 **ERRORS}, parameters=[TYPE]),
        },
        "/api/v1/query": {
            "post": _op("Query Things with a filter", "viewer", {"200": _resp("a page", PAGE), **ERRORS},
                        requestBody={"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Query"}}}}),
        },
        "/api/v1/deadletters": {
            "get": _op("Newest rejected MQTT messages", "viewer", {"200": _resp("dead letters"), **ERRORS},
                       parameters=[{"name": "limit", "in": "query", "schema": {"type": "integer"}},
                                   {"name": "reason", "in": "query", "schema": {"type": "string"}}]),
        },
        "/api/v1/ws": {
            "get": _op("WebSocket: subscribe/unsubscribe by thingId, filter or everything; StateChanged and "
                       "AnomalyDetected/Updated/Acknowledged/Resolved events, Heartbeat every 30 s. Token as "
                       "Bearer header or access_token query.",
                       "viewer", {"101": _resp("switching protocols"), **ERRORS}),
        },
        "/": {"get": _op("Redirects to the web viewer", None, {"302": _resp("to /viewer/")})},
        "/viewer/{path}": {"get": _op("The web viewer's static files (the page signs in with an API key)", None,
                                      {"200": _resp("a file"), "404": _resp("no such file")},
                                      parameters=[{"name": "path", "in": "path", "required": True,
                                                   "schema": {"type": "string"}}])},
        "/api/v1/nodes": {"get": _op("Nodes seen on the network: pending, approved or rejected", "admin",
                                     {"200": _resp("nodes"), **ERRORS},
                                     parameters=[{"name": "state", "in": "query", "required": False,
                                                  "schema": {"type": "string",
                                                             "enum": ["pending", "approved", "rejected"]}}])},
        "/api/v1/nodes/{id}/approve": {
            "post": _op("Approve a node: its Thing, its own MQTT user and ACL entry, credentials handed over", "admin",
                        {"200": _resp("the node"), **ERRORS, **CONFLICT, "503": _resp("the broker files failed")},
                        parameters=[ID]),
        },
        "/api/v1/nodes/{id}/reject": {
            "post": _op("Reject a node: no MQTT user (any it had is removed)", "admin",
                        {"200": _resp("the node"), **ERRORS, "503": _resp("the broker files failed")},
                        parameters=[ID]),
        },
        "/api/v1/connectors/devices": {
            "get": _op("PLC connector devices (Modbus, OPC UA, S7) with their health", "operator",
                       {"200": _resp("devices"), **ERRORS}),
            "post": _op("Add a connector device; it polls at once, others undisturbed", "admin",
                        {"201": _resp("the device"), **ERRORS, **CONFLICT},
                        requestBody={"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ConnectorDevice"}}}}),
        },
        "/api/v1/connectors/devices/{name}": {
            "get": _op("One connector device with its health", "operator", {"200": _resp("the device"), **ERRORS},
                       parameters=[DEVICE]),
            "put": _op("Add or replace a connector device; only its own connection restarts", "admin",
                       {"200": _resp("replaced"), "201": _resp("created"), **ERRORS, **CONFLICT},
                       parameters=[DEVICE], requestBody={"required": True, "content": {"application/json": {
                           "schema": {"$ref": "#/components/schemas/ConnectorDevice"}}}}),
            "delete": _op("Remove a connector device (its Thing and history stay)", "admin",
                          {"204": _resp("removed"), **ERRORS, **CONFLICT}, parameters=[DEVICE]),
        },
        "/api/v1/connectors/devices/{name}/register-map": {
            "post": _op("Import a Modbus register-map CSV (address,name,type,scale,unit,...) into a device", "admin",
                        {"200": _resp("the device"), **ERRORS, **CONFLICT},
                        parameters=[DEVICE, {"name": "replace", "in": "query", "required": False,
                                             "schema": {"type": "boolean"}}],
                        requestBody={"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}),
        },
        "/api/v1/uplink/quarantine": {"get": _op(
            "Things and anomalies the aggregator refused, held back by the forwarder", "viewer",
            {"200": _resp("held items", {"type": "object", "required": ["items", "total"], "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Held"}},
                "total": {"type": "integer"}}}), **ERRORS})},
        "/api/v1/uplink/quarantine/{id}/resend": {"post": _op(
            "Send a held Thing's points again (refused again, it is held again)", "admin",
            {"202": _resp("being re-sent", {"$ref": "#/components/schemas/Held"}), **ERRORS},
            parameters=[HELD_ID])},
        "/api/v1/uplink/quarantine/{id}": {"delete": _op(
            "Give up what is held of a Thing or anomaly: never sent (local history keeps it)", "admin",
            {"200": _resp("dropped", {"$ref": "#/components/schemas/Held"}), **ERRORS},
            parameters=[HELD_ID])},
        "/api/v1/layout": {"get": _op("The floor layout of the line (layout.json in the data directory)",
                                      "viewer", {"200": _resp("layout"), **ERRORS})},
        "/health": {"get": _op("Liveness", None, {"200": _resp("alive")})},
        "/ready": {"get": _op("Readiness (twin loaded, broker connected)", None,
                              {"200": _resp("ready"), "503": _resp("not ready")})},
        "/metrics": {"get": _op("Prometheus metrics", None, {"200": _resp("text exposition format")})},
        "/api/v1/openapi.json": {"get": _op("This document", None, {"200": _resp("OpenAPI 3.1")})},
    },
}



def _q(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string", **schema},
            "description": description}


_SCOPE = [_q("scope", "machine, line or site", enum=["machine", "line", "site"], default="site"),
          _q("id", "the Thing id, the line, or the site (default this gateway's)"),
          _q("from", "ISO 8601 or epoch seconds; default 24 h before `to`"), _q("to", "ISO 8601 or epoch; default now")]
_REASON_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["reason"], "additionalProperties": False,
    "properties": {"reason": {"type": "string"}, "note": {"type": "string", "maxLength": 2000}}}}}}
_STATE_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["state"], "additionalProperties": False,
    "properties": {"state": {"type": "string", "enum": ["planned_stop", "changeover", "auto"]},
                   "reason": {"type": "string"}, "note": {"type": "string", "maxLength": 2000}}}}}}
SPEC["paths"].update({  # the alarm journal
    "/api/v1/anomalies/{id}/journal": {"get": _op("Who acknowledged, resolved or shelved an anomaly, with comments",
                                                  "viewer", {"200": _resp("actions"), **ERRORS}, parameters=[ID])},
    "/api/v1/anomalies/{id}/shelve": {"post": _op("Silence the anomaly's condition for some hours, saying why",
                                                  "operator", {"200": _resp("the shelf"), **ERRORS}, parameters=[ID],
                                                  requestBody={"required": True, "content": {"application/json": {
                                                      "schema": {"type": "object", "required": ["hours", "reason"],
                                                                 "properties": {"hours": {"type": "number"},
                                                                                "reason": {"type": "string"}}}}}})},
    "/api/v1/alarm-shelves": {"get": _op("Shelves silencing now (or all)", "viewer",
                                         {"200": _resp("shelves"), **ERRORS},
                                         parameters=[_q("active", "true (default) or false")])},
    "/api/v1/alarm-shelves/{id}": {"delete": _op("End a shelf early", "operator", {"200": _resp("the shelf"), **ERRORS},
                                                 parameters=[ID])},
})
SPEC["paths"].update({  # OEE and downtime (docs/oee.md)
    "/api/v1/oee": {"get": _op("OEE with availability, performance and quality of a machine, line or site", "viewer",
                               {"200": _resp("figures, total and per bucket"), **ERRORS},
                               parameters=[*_SCOPE, _q("by", "bucket", enum=["shift", "hour", "day", "none"],
                                                       default="shift")])},
    "/api/v1/downtime": {"get": _op("The six big losses and the stops by reason (a Pareto)", "viewer",
                                    {"200": _resp("losses and Pareto"), **ERRORS},
                                    parameters=[*_SCOPE, _q("state", "stop states, comma-separated")])},
    "/api/v1/oee/events": {"get": _op("State events overlapping the range, oldest first", "viewer",
                                      {"200": _resp("events"), **ERRORS},
                                      parameters=[*_SCOPE, _q("state", "comma-separated"),
                                                  _q("limit", "1..50000, default 5000")])},
    "/api/v1/oee/states": {"get": _op("Every tracked machine's state now", "viewer", {"200": _resp("states"), **ERRORS},
                                      parameters=[_q("thingId", "one machine"), _q("line", "one line")])},
    "/api/v1/oee/reasons": {"get": _op("The site's reason codes", "viewer", {"200": _resp("reasons"), **ERRORS})},
    "/api/v1/oee/events/{id}/reason": {
        "put": _op("Set or correct the reason of a state event (its times never change)", "operator",
                   {"200": _resp("the event"), **ERRORS},
                   parameters=[{**ID, "example": "4f3c9a0e2b7d4c18a1e5f6b7c8d9e0f1"}], requestBody=_REASON_BODY)},
    "/api/v1/oee/machines/{id}/state": {
        "post": _op("Start a planned stop or changeover, or hand back to the rules (auto)", "operator",
                    {"200": _resp("the machine's state"), **ERRORS}, parameters=[ID], requestBody=_STATE_BODY)},
})


@requires(None)
async def handler(request: web.Request) -> web.Response:
    return web.json_response(SPEC)
