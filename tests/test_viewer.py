"""The web viewer in a real Chromium against a real running demo (aggregator, two gateways with
their brokers and simulated fleets): site cards, a fault turning a machine red with a toast,
acknowledgement seen by every viewer, timeline playback, the 2D table, sign-in, and a gateway
serving its own line. Screenshots of each state go to test-artifacts/viewer/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import find_free_port
from tests.helpers import EGIZ, wait_until

CHROMIUM = os.environ.get("EGIZ_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "viewer"
SITE, LINE, OVEN = "izmir-bakery", "line-a", "izmir-bakery:oven-001"
MACHINES = 8  # the first line: six simulated ESP32 nodes, the demo's Modbus oven PLC and its OPC UA proofer PLC
FAULT_AT = 60  # seconds after the fleet starts (the machines, PLCs among them, are all online well before);
# 60 °C over the setpoint at the end of its 60 s ramp, so the "zone above setpoint + 20" rule fires about 20 s in

pytestmark = pytest.mark.timeout(300)


def need_chromium() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        message = "needs Chromium and Playwright: apt-get install chromium; pip install playwright"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def get(url: str, key: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_chromium()
    tmp = tmp_path_factory.mktemp("viewer-demo")
    agg_port, http_port = find_free_port(), find_free_port()
    log = (tmp / "demo.log").open("wb")
    proc = subprocess.Popen([EGIZ, "demo", "--data-dir", str(tmp / "demo"), "--sites", "2", "--lines", "1",
                             "--nodes", "6", "--rate", "2", "--aggregator-port", str(agg_port),
                             "--http-port", str(http_port), "--faults", f"overtemperature:oven-001@{FAULT_AT}+900=60"],
                            stdout=log, stderr=log)
    agg = f"http://127.0.0.1:{agg_port}"
    try:
        wait_until("the demo's aggregator sees both sites", lambda: len(get(f"{agg}/api/v1/sites")["items"]) == 2
                   and sorted(s["nodes"]["online"] for s in get(f"{agg}/api/v1/sites")["items"]) == [6, MACHINES], 60)
        yield {"agg": agg, "gateway": f"http://127.0.0.1:{http_port}", "started": time.time(), "log": tmp / "demo.log"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(demo: dict[str, Any]) -> Iterator[Any]:
    sync_playwright = need_chromium()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(autouse=True)
def close_pages(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's pages close when it ends: a live 3D page left open would compete for the CPU."""
    yield
    if "browser" in request.fixturenames:
        for context in request.getfixturevalue("browser").contexts:
            context.close()


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.add_init_script("""
        window.__toasts = [];
        new MutationObserver((ms) => { for (const m of ms) for (const n of m.addedNodes)
            if (n.classList && n.classList.contains('toast'))
              window.__toasts.push({t: Date.now(), text: n.textContent}); })
          .observe(document, {childList: true, subtree: true});""")
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.errors = errors
    return page


def states(page: Any) -> dict[str, tuple[str, str]]:
    return page.eval_on_selector_all("#machine-states li", "els => Object.fromEntries(els.map(e => "
                                     "[e.dataset.thing, [e.dataset.state, e.dataset.anomaly]]))")


def test_dashboard_cards_show_what_the_api_returns(demo: dict[str, Any], browser: Any) -> None:
    page = open_page(browser, demo["agg"] + "/")
    page.wait_for_selector("#site-cards .card")

    def same() -> bool:
        want = {}
        for s in get(demo["agg"] + "/api/v1/sites")["items"]:
            nodes = s["nodes"]
            want[s["site"]] = {"nodes": f"{nodes['online']} / {nodes['online'] + nodes['offline']}",
                               "open": str(s["anomalies"]["open"]), "lines": str(len(s["lines"]))}
        shown = page.eval_on_selector_all("#site-cards .card", """els => Object.fromEntries(els.map(e => [
            e.dataset.site, {nodes: e.querySelector('[data-field=nodes]').textContent,
                             open: e.querySelector('[data-field=open]').textContent,
                             lines: e.querySelector('[data-field=lines]').textContent}]))""")
        return len(want) == 2 and shown == want

    wait_until("site cards equal /api/v1/sites", same)
    assert page.get_attribute(f'#site-cards .card[data-site="{SITE}"]', "data-health")
    page.screenshot(path=str(SHOTS / "1-dashboard.png"))
    page.click(f'#site-cards .card[data-site="{SITE}"]')
    page.wait_for_selector(f'#line-cards .card[data-line="{LINE}"]')
    page.screenshot(path=str(SHOTS / "2-site.png"))
    page.click(f'#line-cards .card[data-line="{LINE}"] h2')
    wait_until("the line's machines", lambda: len(states(page)) == MACHINES)
    page.wait_for_selector("#stage canvas")
    page.screenshot(path=str(SHOTS / "3-line-3d.png"))
    assert not page.errors, page.errors


def test_a_fault_turns_the_machine_red_with_a_toast_and_acknowledge_clears_it_for_everyone(
        demo: dict[str, Any], browser: Any) -> None:
    url = f"{demo['agg']}/viewer/#/line/{SITE}/{LINE}"
    first, second = open_page(browser, url), open_page(browser, url)
    for page in (first, second):
        wait_until("the line's machines", lambda p=page: len(states(p)) == MACHINES)
    assert states(first)[OVEN][0] != "critical", "the fault is scheduled later; the test would prove nothing"
    wait_until("the oven turns red", lambda: states(first)[OVEN] == ["critical", "true"], FAULT_AT + 90)
    anomaly = wait_until("the anomaly in the API", lambda: get(
        f"{demo['agg']}/api/v1/anomalies?state=open&thingId={OVEN}")["items"][0])
    opened = datetime.fromisoformat(anomaly["openedAt"].replace("Z", "+00:00")).timestamp()
    toast = wait_until("a toast", lambda: next(t for t in first.evaluate("window.__toasts") if "oven-001" in t["text"]))
    delay = toast["t"] / 1000 - opened
    print(json.dumps({"figure": "anomaly_to_toast", "value": round(delay, 3), "unit": "s", "target": "<= 5"}))
    assert delay <= 15.0, delay  # the figure above is held to 5 s; a busy test machine gets slack
    wait_until("the second viewer shows it too", lambda: states(second)[OVEN] == ["critical", "true"], 10)
    first.screenshot(path=str(SHOTS / "4-anomaly.png"))

    first.click(".toast >> text=oven-001")
    first.wait_for_selector("#ack")
    first.wait_for_selector("#panel-explanation")
    assert "zone" in first.text_content("#panel-explanation")
    first.screenshot(path=str(SHOTS / "5-detail-panel.png"))
    first.click("#ack")
    for page in (first, second):
        wait_until("acknowledged everywhere", lambda p=page: states(p)[OVEN][1] == "false", 20)
    assert get(f"{demo['agg']}/api/v1/anomalies/{anomaly['id']}")["state"] == "acknowledged"
    second.screenshot(path=str(SHOTS / "6-acknowledged.png"))

    # the past: replay the last 15 minutes and stand at the moment the anomaly was open
    first.select_option("#tl-range", "900")
    first.click("#tl-load")
    first.wait_for_selector('#timeline[data-mode="playback"]', timeout=30000)
    first.evaluate(f"window.egiz.view.seekTime({opened + 1})")
    wait_until("the past state", lambda: states(first)[OVEN] == ["critical", "true"], 5)
    first.screenshot(path=str(SHOTS / "7-playback.png"))
    first.click('#timeline button[data-speed="10"]')
    first.evaluate("window.egiz.view.seekTime(window.egiz.view.model.from + 10)")  # far from the range's end
    first.click("#tl-play")
    t0 = float(first.get_attribute("#tl-time", "data-time"))
    time.sleep(3)
    moved = float(first.get_attribute("#tl-time", "data-time")) - t0
    assert moved >= 15, f"10x playback should move ~30 s in 3 s, moved {moved:.1f} s"
    first.click("#tl-live")
    wait_until("live again", lambda: states(first)[OVEN][1] == "false", 5)
    assert not first.errors and not second.errors, first.errors + second.errors


def test_the_table_lists_the_same_things(demo: dict[str, Any], browser: Any) -> None:
    page = open_page(browser, f"{demo['agg']}/viewer/#/table/{SITE}/{LINE}")
    want = sorted(t["id"] for t in get(f"{demo['agg']}/api/v1/things?site={SITE}&line={LINE}")["items"])
    wait_until("table rows", lambda: sorted(page.eval_on_selector_all(
        "#things-table tbody tr", "els => els.map(e => e.dataset.thing)")) == want)
    assert len(want) == MACHINES
    page.screenshot(path=str(SHOTS / "8-table.png"))


def test_a_gateway_serves_the_viewer_for_its_own_line(demo: dict[str, Any], browser: Any) -> None:
    page = open_page(browser, demo["gateway"] + "/")
    try:
        wait_until("its line", lambda: page.evaluate("location.hash") == f"#/line/{SITE}/{LINE}"
                   and len(states(page)) == MACHINES, 30)
    except AssertionError as exc:  # say what the page shows instead
        raise AssertionError(f"{exc}; at {page.url}: {page.inner_text('body')[:600]!r}; errors {page.errors}") from None
    page.wait_for_selector("#stage canvas")
    page.screenshot(path=str(SHOTS / "9-gateway-line.png"))
    assert not page.errors, page.errors


def test_the_devices_page_shows_plc_health_and_live_tag_values(demo: dict[str, Any], browser: Any) -> None:
    page = open_page(browser, demo["gateway"] + "/#/devices")
    page.wait_for_selector('#devices-table tr[data-device="oven-900-plc"][data-state="online"]', timeout=30000)
    row = page.inner_text('#devices-table tr[data-device="oven-900-plc"]')
    assert "modbus" in row and f"{SITE}:oven-900" in row and "config" in row
    setpoint = '.device-tags[data-device="oven-900-plc"] tr[data-tag="thermal.setpoint"] td.value'
    wait_until("the setpoint's live value", lambda: page.inner_text(setpoint) == "190", 20)
    zone = '.device-tags[data-device="oven-900-plc"] tr[data-tag="thermal.temperature_zones_0"] td.value'
    wait_until("a zone temperature", lambda: page.inner_text(zone) not in ("", "—"), 20)
    page.screenshot(path=str(SHOTS / "10-devices.png"))
    # the editor loads a device by clicking it; a configured one is changed in gateway.toml, and says so
    page.click('#devices-table tr[data-device="oven-900-plc"]')
    assert '"name": "oven-900-plc"' in page.input_value("#device-json")
    page.click("#device-save")
    page.wait_for_selector("#device-status.error:has-text('configuration file')")
    assert not page.errors, page.errors


def test_sign_in_with_an_api_key(browser: Any, tmp_path: Path) -> None:
    from cloud_sync.config import load_aggregator_config

    port = find_free_port()
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(f'[aggregator]\ndata_dir = "{tmp_path / "agg"}"\n[http]\nhost = "127.0.0.1"\nport = {port}\n'
                   '[auth]\napi_keys = [{ key = "viewer-key-0123456789", role = "viewer" }]\n')
    load_aggregator_config(cfg, environ={})  # the file is valid before the process starts
    proc = subprocess.Popen([EGIZ, "aggregator", "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until("aggregator ready", lambda: get(f"http://127.0.0.1:{port}/ready"), 20)
        page = open_page(browser, f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#signin")
        page.fill("#apikey", "wrong-key")
        page.click("#signin button")
        page.wait_for_selector("#signin-error:has-text('not accepted')")
        page.fill("#apikey", "viewer-key-0123456789")
        page.click("#signin button")
        page.wait_for_selector("#site-cards", state="attached")  # empty: no gateway has reported yet
        assert page.get_attribute("#conn", "data-state") in ("connecting", "live")
        wait_until("live", lambda: page.get_attribute("#conn", "data-state") == "live", 10)
        page.screenshot(path=str(SHOTS / "0-sign-in.png"))
    finally:
        proc.terminate()
        proc.wait(20)


def test_vendored_libraries_are_the_pinned_versions() -> None:
    vendor = Path(__file__).resolve().parent.parent / "viewer" / "vendor"
    pins = json.loads((vendor / "versions.json").read_text())
    revision = pins["three"]["version"].split(".")[1]
    assert f"const REVISION = '{revision}';" in (vendor / "three" / "three.core.js").read_text()[:5000]
    assert (vendor / "three" / "LICENSE").read_text().startswith("The MIT License")
    assert "uPlot.js" in (vendor / "uplot" / "uPlot.esm.js").read_text()[:400]
    assert "MIT" in (vendor / "uplot" / "LICENSE").read_text()


def test_oee_tiles_match_the_api_and_an_operator_sets_a_downtime_reason(demo: dict[str, Any], browser: Any) -> None:
    page = open_page(browser, demo["agg"] + "/")
    tile = f'#site-cards .card[data-site="{SITE}"] .oee-tile'
    page.wait_for_selector(f"{tile} .oee-factors", timeout=30000)
    want = get(f"{demo['agg']}/api/v1/oee?scope=site&id={SITE}&by=none")["total"]
    shown = page.get_attribute(tile, "data-oee")
    assert shown == ("" if want["oee"] is None else str(want["oee"])) or want["oee"] is not None, (shown, want)
    assert page.text_content(f'{tile} [data-factor="availability"]').startswith("A ")

    oven = f"{demo['gateway']}/api/v1/oee/machines/{OVEN}/state"
    for state in ("changeover", "auto"):  # an operator's changeover: a stop with a reason to correct
        req = urllib.request.Request(oven, data=json.dumps({"state": state}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
        time.sleep(1.5)
    gw = open_page(browser, f"{demo['gateway']}/viewer/#/oee/{SITE}/{LINE}")
    gw.wait_for_selector(f'.state-band[data-thing="{OVEN}"] .seg[data-state="changeover"]', timeout=30000)
    assert gw.eval_on_selector_all(".state-band", "els => els.length") == 6
    assert gw.eval_on_selector_all("#oee-tiles .oee-tile", "els => els.length") == 7  # the line and six machines
    gw.wait_for_selector("#pareto canvas, #pareto p")
    gw.screenshot(path=str(SHOTS / "10-oee-line.png"))
    event_id = gw.get_attribute(f'.state-band[data-thing="{OVEN}"] .seg[data-state="changeover"]', "data-event")
    gw.click(f'#stops tr[data-event="{event_id}"] button')  # the stop, listed under the bands
    assert gw.get_attribute("#reason-box", "data-event") == event_id
    gw.select_option("#reason-select", "recipe_change")
    gw.fill("#reason-note", "croissant to simit")
    gw.click("#reason-save")
    gw.wait_for_selector("#reason-status:text('saved')")
    events = get(f"{demo['gateway']}/api/v1/oee/events?scope=machine&id={OVEN}&state=changeover")["items"]
    saved = next(e for e in events if e["id"] == event_id)
    assert (saved["reason"], saved["note"]) == ("recipe_change", "croissant to simit")
    # the Pareto counts stops in planned time: a changeover made during the calendar's break is not among them
    if saved["plannedS"] > 0:
        wait_until("the Pareto names it",
                   lambda: "recipe_change" in (gw.get_attribute("#pareto", "data-reasons") or ""))
    else:
        pareto = get(f"{demo['gateway']}/api/v1/downtime?scope=line&id={LINE}")["pareto"]
        assert "recipe_change" not in [p["reason"] for p in pareto], pareto
    gw.screenshot(path=str(SHOTS / "11-reason-set.png"))

    # the aggregator draws the same bands from what the gateway forwarded; reasons are set at the gateway
    central = open_page(browser, f"{demo['agg']}/viewer/#/oee/{SITE}/{LINE}")
    central.wait_for_selector(f'.state-band[data-thing="{OVEN}"] .seg[data-state="changeover"]', timeout=60000)
    assert central.eval_on_selector_all(".state-band", "els => els.length") == 6
    assert central.query_selector("#stops button") is None
    central.screenshot(path=str(SHOTS / "12-oee-line-central.png"))
    assert not page.errors and not gw.errors and not central.errors, page.errors + gw.errors + central.errors


def test_the_alarms_page_filters_acts_shelves_and_exports(demo: dict[str, Any], browser: Any) -> None:
    page = open_page(browser, f"{demo['gateway']}/viewer/#/alarms")
    page.wait_for_selector("#alarm-filters")
    page.select_option("#f-state", "")
    page.fill("#f-thingId", OVEN)
    page.click("#alarm-filters button[type=submit]")
    row = wait_until("the oven's anomaly in the journal", lambda: page.query_selector("#alarms tbody tr[data-id]")
                     or page.click("#alarm-filters button[type=submit]"), FAULT_AT + 90)
    anomaly_id = row.get_attribute("data-id")
    assert get(f"{demo['gateway']}/api/v1/anomalies/{anomaly_id}")["thingId"] == OVEN
    page.click(f'#alarms tr[data-id="{anomaly_id}"] button')
    page.wait_for_selector(f'#alarm-detail[data-id="{anomaly_id}"]')
    if page.query_selector("#alarm-ack"):
        page.fill("#alarm-comment", "checking the zone 2 probe")
        page.click("#alarm-ack")
        page.wait_for_selector('#alarm-journal li[data-action="acknowledged"]')
    page.fill("#shelve-hours", "4")
    page.fill("#shelve-reason", "probe being replaced")
    page.click("#alarm-shelve")
    page.wait_for_selector('#alarm-journal li[data-action="shelved"]')
    assert "probe being replaced" in page.text_content('#alarm-journal li[data-action="shelved"]')
    page.select_option("#f-shelved", "true")
    page.click("#alarm-filters button[type=submit]")
    wait_until("only the shelved one", lambda: page.eval_on_selector_all(
        "#alarms tbody tr[data-id]", "els => els.map(e => e.dataset.id)") == [anomaly_id])
    assert page.text_content(f'#alarms tr[data-id="{anomaly_id}"] [data-field=shelved]')
    with page.expect_download() as download:
        page.click("#alarm-export")
    text = Path(download.value.path()).read_text()
    assert text.splitlines()[0].startswith("id,thingId,") and anomaly_id in text
    page.screenshot(path=str(SHOTS / "12-alarms.png"))
    journal = get(f"{demo['gateway']}/api/v1/anomalies/{anomaly_id}/journal")["items"]
    assert "shelved" in [x["action"] for x in journal]
    assert not page.errors, page.errors


def test_the_aggregators_alarms_page_shows_every_site_with_the_gateways_shelf_and_journal(
        demo: dict[str, Any], browser: Any) -> None:
    """After the gateway's alarms page shelved the oven's anomaly: the aggregator's page finds it by site
    and shelf, shows who shelved it and why, and exports rows that say where they come from."""
    page = open_page(browser, f"{demo['agg']}/viewer/#/alarms")
    page.wait_for_selector("#alarm-filters")
    page.select_option("#f-state", "")
    page.select_option("#f-site", SITE)
    page.select_option("#f-shelved", "true")
    page.fill("#f-thingId", OVEN)
    page.click("#alarm-filters button[type=submit]")
    def filtered() -> Any:  # the table shows the whole filter's rows (not an earlier, partial one's) and one arrived
        rows = page.query_selector_all("#alarms tbody tr[data-id]")
        return rows[0] if rows and all(
            r.eval_on_selector("[data-field=site]", "e => e.textContent").startswith(SITE)
            and r.eval_on_selector("[data-field=thingId]", "e => e.textContent") == OVEN
            and r.eval_on_selector("[data-field=shelved]", "e => e.textContent") for r in rows) else None
    row = wait_until("the shelved anomaly arrived from the gateway",
                     lambda: filtered() or page.click("#alarm-filters button[type=submit]"), 60)
    anomaly_id = row.get_attribute("data-id")
    doc = get(f"{demo['agg']}/api/v1/anomalies/{anomaly_id}")
    assert doc["thingId"] == OVEN and doc["site"] == SITE and doc["shelved"]["reason"] == "probe being replaced"
    assert page.text_content(f'#alarms tr[data-id="{anomaly_id}"] [data-field=site]').startswith(SITE)
    page.click(f'#alarms tr[data-id="{anomaly_id}"] button')
    page.wait_for_selector(f'#alarm-detail[data-id="{anomaly_id}"]')
    assert "probe being replaced" in page.text_content("#alarm-shelf")
    assert "probe being replaced" in page.text_content('#alarm-journal li[data-action="shelved"]')
    assert not page.query_selector("#alarm-shelve")  # shelves are set at the line's gateway
    with page.expect_download() as download:
        page.click("#alarm-export")
    text = Path(download.value.path()).read_text()
    assert text.splitlines()[0].startswith("site,line,gatewayId,id,thingId,") and anomaly_id in text
    page.screenshot(path=str(SHOTS / "13-alarms-all-sites.png"))
    assert not page.errors, page.errors
