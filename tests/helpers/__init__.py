"""What many tests need, written once: services (skip locally, fail under CI), waiting, `egiz` processes
and their readiness, brokers of a test's own, configurations, gateways under test, telemetry builders,
HTTP peers. Fixtures stay in tests/conftest.py; no test imports another test module."""

from tests.helpers.brokers import private_mosquitto, receive
from tests.helpers.configs import (
    ADMIN_KEY,
    OPERATOR_KEY,
    OTHER_TOKEN,
    TOKEN,
    VIEWER_KEY,
    aggregator_config,
    aggregator_toml,
    auth,
    gateway_config,
    gateway_toml,
    open_gateway_toml,
    unique_site,
    uplink,
    uplink_token,
    write_toml,
)
from tests.helpers.gateways import (
    AggregatorFactory,
    GatewayFactory,
    GatewayProcess,
    LinkedFactory,
    LinkedSite,
    RunningGateway,
    gateway_process,
)
from tests.helpers.lifecycle import all_stopped
from tests.helpers.models import ZONE_TOO_HOT_RULES, press_rows, train_press_versions, version_in_use
from tests.helpers.pki import SitePki, make_site_pki
from tests.helpers.processes import EGIZ, egiz_process, wait_ready
from tests.helpers.services import BROKER_HOST, BROKER_PORT, need, need_mosquitto, need_service
from tests.helpers.telemetry import (
    T_BASE,
    THINGS,
    exact,
    publish_lines,
    publish_ovens,
    reading,
    stored_lines,
    telemetry,
    topic,
)
from tests.helpers.waiting import wait_for, wait_until
from tests.helpers.web import serve

__all__ = [
    "ADMIN_KEY", "BROKER_HOST", "BROKER_PORT", "EGIZ", "OPERATOR_KEY", "OTHER_TOKEN", "THINGS", "TOKEN", "T_BASE",
    "VIEWER_KEY", "ZONE_TOO_HOT_RULES", "AggregatorFactory", "GatewayFactory", "GatewayProcess", "RunningGateway",
    "aggregator_config",
    "aggregator_toml", "all_stopped", "auth", "egiz_process", "exact", "gateway_config", "gateway_process",
    "gateway_toml", "need", "need_mosquitto", "need_service", "private_mosquitto", "publish_lines", "publish_ovens",
    "reading", "receive", "serve", "telemetry", "topic", "unique_site", "uplink", "version_in_use", "wait_for",
    "wait_ready", "wait_until", "write_toml",
]
__all__ += ["LinkedFactory", "LinkedSite", "uplink_token"]
__all__ += ["SitePki", "make_site_pki", "open_gateway_toml", "press_rows", "stored_lines", "train_press_versions"]
