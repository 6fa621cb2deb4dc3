"""What both services' OpenAPI documents are built from: operations with the role they need, responses,
and the one error body."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {"type": "object", "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}
BEARER = {"bearer": {"type": "http", "scheme": "bearer",
                     "description": "API key; roles viewer < operator < admin"}}


def response(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response with an optional JSON schema."""
    out: dict[str, Any] = {"description": desc}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def operation(summary: str, role: str | None, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An operation; `role` None is public (or checks a gateway token itself), else an API key of that role."""
    op: dict[str, Any] = {"summary": summary, "responses": responses, **more}
    op["security"] = [] if role is None else [{"bearer": []}]
    if role is not None:
        op["x-egiz-role"] = role
    return op
