"""One small error tree for the gateway, carrying structured fields instead of formatted strings."""

from __future__ import annotations


class EgizError(Exception):
    """Base of every error the gateway raises on purpose."""

    code = "error"

    def __init__(self, detail: str, **fields: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields = fields


class ConfigError(EgizError):
    """The configuration is invalid; `problems` lists every `(dotted.key, message)` at once."""

    code = "invalid_config"

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        lines = "; ".join(f"{key}: {msg}" for key, msg in problems)
        super().__init__(f"invalid configuration: {lines}")
        self.problems = problems


class RejectedMessage(EgizError):
    """An MQTT message that cannot be accepted; it goes to the dead-letter table."""

    code = "rejected"

    def __init__(self, reason: str, detail: str, *, topic: str = "") -> None:
        super().__init__(detail, reason=reason, topic=topic)
        self.reason = reason
        self.topic = topic


class NotFound(EgizError):
    """A Thing or feature that does not exist."""

    code = "not_found"


class Conflict(EgizError):
    """A write based on a stale version, or a create of an id that exists."""

    code = "conflict"


class Invalid(EgizError):
    """A request body or parameter that does not satisfy the contract."""

    code = "invalid"
