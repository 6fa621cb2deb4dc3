// OpenEgiz Edge node: reads one machine's sensors and publishes them to the line gateway's broker as
// the contract says (docs/topics.md). Everything that can be decided without the hardware lives in
// core/ (payloads, outage ring, uplink batches, backoff, topics, provisioning, commands, readings)
// and is tested on a PC; this file wires it to the ESP32:
//
//   setup():  identity from NVS -> Wi-Fi (captive portal on first set-up) -> mDNS announcement and
//             provisioning endpoint -> sensors -> MQTT with the stored credentials, if any
//   loop():   never waits long: HTTP requests, broker events, update results, reconnects with
//             backoff, one short sensor step, one message to the broker
#include <Arduino.h>
#include <ESPmDNS.h>
#include <Preferences.h>
#include <WebServer.h>
#include <WiFi.h>
#include <WiFiManager.h>
#include <esp_idf_version.h>
#include <esp_system.h>
#include <esp_task_wdt.h>
#include <mdns.h>
#include <sys/time.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "board.h"
#include "egiz/backoff.h"
#include "egiz/commands.h"
#include "egiz/identity.h"
#include "egiz/payload.h"
#include "egiz/provisioning.h"
#include "egiz/readings.h"
#include "egiz/ring.h"
#include "egiz/topics.h"
#include "egiz/uplink.h"
#include "machine.h"
#include "mqtt_link.h"
#include "sensors.h"
#include "updater.h"

namespace {

const char* const kFw = EGIZ_FW_VERSION;

// ------------------------------------------------------------------------------------------ state
Preferences nvs;  // namespace "egiz": id, type, prov, interval, setpoint, boots, ota_*
WebServer http(board::kProvisionPort);
MqttLink link;
Sensors sensors;
MachineInputs machine;  // production counters and state, when built with EGIZ_PRODUCTION
Updater updater;

std::string node_id, node_type, node_mac, boot_id;
const egiz::TypeProfile* profile = nullptr;
egiz::NodeSettings settings;
egiz::Provisioning prov;
bool provisioned = false;
bool credentials_refused = false;  // the broker said "not authorised": new credentials are welcome
bool restart_link = false;         // set by the provisioning endpoint, acted on in loop()

std::unique_ptr<egiz::ReadingRing> ring;
std::unique_ptr<egiz::Uplink> uplink;
egiz::Backoff backoff(board::kBackoffBaseMs, board::kBackoffCapMs, 1);
egiz::RecentCommands recent;
egiz::Ticker ticker(egiz::kDefaultIntervalMs);
std::vector<Reading> fresh;

bool connected = false;
bool reconnect_waiting = false;
uint32_t reconnect_at = 0, failures = 0, last_attempt = 0;

// Updates: the command being worked on, and what the previous image left for this one to answer.
std::string update_cmd;
egiz::OtaRequest update_request;
std::string landed_cmd, landed_url, landed_sha;
bool landed_ok = false;
bool on_trial = false;
uint32_t trial_started = 0, restart_at = 0;
bool restart_pending = false;

std::string ntp_servers[3];
uint32_t last_report = 0;

// ------------------------------------------------------------------------------------------ time, acks
int64_t epoch_ms() {
  timeval tv;
  gettimeofday(&tv, nullptr);
  return static_cast<int64_t>(tv.tv_sec) * 1000 + tv.tv_usec / 1000;
}
double epoch_s() { return static_cast<double>(epoch_ms()) / 1000.0; }
bool clock_set() { return egiz::clock_valid(epoch_s()); }
bool setpoint_in_thermal() { return std::strcmp(profile->setpoint.feature, profile->thermal_feature) == 0; }

void publish_ack(const egiz::Ack& ack) {
  if (provisioned) link.publish(egiz::ack_topic(prov.topic_prefix), egiz::encode_ack(ack), false);
}

// ------------------------------------------------------------------------------------------ identity
void load_identity() {
  nvs.begin("egiz", false);
  uint8_t mac[6];
  WiFi.macAddress(mac);
  node_mac = egiz::format_mac(mac);
  node_type = nvs.getString("type", "oven").c_str();
  if (!egiz::valid_node_type(node_type)) node_type = "oven";
  node_id = nvs.getString("id", "").c_str();
  if (!egiz::valid_node_id(node_id)) node_id = egiz::default_node_id(node_type, mac);
  profile = egiz::profile_for(node_type);
  settings.interval_ms = nvs.getUInt("interval", egiz::kDefaultIntervalMs);
  settings.setpoint = nvs.getDouble("setpoint", profile->setpoint.initial);
  settings = settings.sanitized(*profile);
  std::string err;
  String doc = nvs.getString("prov", "");
  provisioned = doc.length() > 0 && egiz::parse_provisioning(doc.c_str(), prov, err);
  if (doc.length() > 0 && !provisioned) Serial.printf("[setup] stored credentials unreadable (%s): forgotten\n", err.c_str());
}

// First set-up (no Wi-Fi stored) or BOOT held at power-up: an access point "egiz-<id>" with a captive
// portal for the Wi-Fi and the node's equipment id and type. Otherwise the stored Wi-Fi, no portal.
void connect_wifi() {
  bool setup_mode = digitalRead(board::kSetupButton) == LOW;
  WiFiManager portal;
  portal.setConfigPortalTimeout(board::kPortalTimeoutS);
  portal.setConnectTimeout(30);
  WiFiManagerParameter id_field("egiz_id", "Equipment id (lower case, e.g. oven-001)", node_id.c_str(), 63);
  WiFiManagerParameter type_field("egiz_type", "Type: oven, mixer, conveyor, proofer or cooler", node_type.c_str(), 15);
  portal.addParameter(&id_field);
  portal.addParameter(&type_field);
  const std::string ap = "egiz-" + node_id;
  bool saved = portal.getWiFiIsSaved();
  bool ok;
  if (setup_mode) {
    Serial.printf("[setup] BOOT held: set-up portal on access point %s; stored MQTT credentials forgotten\n", ap.c_str());
    nvs.remove("prov");
    provisioned = false;
    ok = portal.startConfigPortal(ap.c_str());
  } else if (!saved) {
    Serial.printf("[setup] no Wi-Fi stored: set-up portal on access point %s\n", ap.c_str());
    ok = portal.autoConnect(ap.c_str());
  } else {
    portal.setEnableConfigPortal(false);  // a stored network that is down now: keep trying, no portal
    ok = portal.autoConnect(ap.c_str());
  }
  std::string id = id_field.getValue(), type = type_field.getValue();
  if (id != node_id || type != node_type) {
    if (egiz::valid_node_id(id) && egiz::valid_node_type(type)) {
      nvs.putString("id", id.c_str());
      nvs.putString("type", type.c_str());
      node_id = id;
      node_type = type;
      profile = egiz::profile_for(type);
      settings = settings.sanitized(*profile);
      Serial.printf("[setup] this node is now %s (%s)\n", node_id.c_str(), node_type.c_str());
    } else {
      Serial.printf("[setup] ignored id '%s' / type '%s': id must be lower case letters, digits, - or _; "
                    "type one of oven, mixer, conveyor, proofer, cooler\n", id.c_str(), type.c_str());
    }
  }
  if (!ok && (setup_mode || !saved)) {
    Serial.println("[setup] portal timed out; restarting");
    ESP.restart();
  }
  WiFi.setAutoReconnect(true);
}

// Time from the gateway's host first (lines often have no internet), then public servers.
void configure_time() {
  ntp_servers[0] = provisioned ? prov.host : "pool.ntp.org";
  ntp_servers[1] = provisioned ? "pool.ntp.org" : "time.google.com";
  ntp_servers[2] = "time.google.com";
  configTime(0, 0, ntp_servers[0].c_str(), ntp_servers[1].c_str(), ntp_servers[2].c_str());
}

// ------------------------------------------------------------------------------------------ mDNS
void advertise() {
  if (!MDNS.begin(node_id.c_str())) {
    Serial.println("[mdns] could not start; the gateway will not see this node");
    return;
  }
  MDNS.setInstanceName(node_id.c_str());
  MDNS.addService("egiz-node", "tcp", board::kProvisionPort);
  MDNS.addServiceTxt("egiz-node", "tcp", "id", node_id.c_str());
  MDNS.addServiceTxt("egiz-node", "tcp", "type", node_type.c_str());
  MDNS.addServiceTxt("egiz-node", "tcp", "fw", kFw);
  MDNS.addServiceTxt("egiz-node", "tcp", "mac", node_mac.c_str());
}

// Announcements of `service` ("_mqtt" or "_egiz-gw") with their TXT site and gateway. Waits up to
// board::kMdnsQueryMs; only called while disconnected.
void browse(const char* service, bool is_broker, std::vector<egiz::Announced>& out) {
  mdns_result_t* results = nullptr;
  if (mdns_query_ptr(service, "_tcp", board::kMdnsQueryMs, 8, &results) != ESP_OK) return;
  for (mdns_result_t* r = results; r; r = r->next) {
    egiz::Announced a;
    a.port = r->port;
    a.is_broker = is_broker;
    for (size_t i = 0; i < r->txt_count; ++i) {
      const char* key = r->txt[i].key;
      const char* value = r->txt[i].value ? r->txt[i].value : "";
      if (std::strcmp(key, "site") == 0) a.site = value;
      if (std::strcmp(key, "gateway") == 0) a.gateway = value;
    }
    for (mdns_ip_addr_t* ip = r->addr; ip; ip = ip->next) {
      if (ip->addr.type == ESP_IPADDR_TYPE_V4) {
        a.host = IPAddress(ip->addr.u_addr.ip4.addr).toString().c_str();
        break;
      }
    }
    out.push_back(a);
  }
  mdns_query_results_free(results);
}

// ------------------------------------------------------------------------------------------ MQTT
void start_link() {
  uplink->set_topic_prefix(prov.topic_prefix);
  link.start(egiz::broker_uri(prov.host, prov.port), prov.username, prov.username, prov.password,
             egiz::status_topic(prov.topic_prefix), egiz::encode_status(false, kFw, -1),
             egiz::command_topic(prov.topic_prefix));
  connected = false;
  reconnect_waiting = false;
  last_attempt = millis();
  Serial.printf("[mqtt] connecting to %s:%u as %s\n", prov.host.c_str(), prov.port, prov.username.c_str());
}

// The broker moved (the gateway got another address): look for it under our site and gateway id.
bool rediscover() {
  std::vector<egiz::Announced> found;
  browse("_mqtt", true, found);
  browse("_egiz-gw", false, found);
  std::string host;
  uint16_t port = 0;
  if (!egiz::choose_broker(found, prov, host, port) || (host == prov.host && port == prov.port)) return false;
  Serial.printf("[mdns] gateway %s now announces its broker at %s:%u\n", prov.gateway.c_str(), host.c_str(), port);
  prov.host = host;
  prov.port = port;
  nvs.putString("prov", egiz::encode_provisioning(prov).c_str());
  start_link();
  return true;
}

void on_command(const std::string& payload) {
  egiz::NodeSettings before = settings;
  egiz::CommandOutcome out = egiz::handle_command(payload, *profile, settings, recent, updater.busy());
  Serial.printf("[cmd] %s\n", out.note.c_str());
  if (settings.interval_ms != before.interval_ms) {
    nvs.putUInt("interval", settings.interval_ms);
    ticker.set_interval(settings.interval_ms, millis());
  }
  if (settings.setpoint != before.setpoint) nvs.putDouble("setpoint", settings.setpoint);
  if (out.answer) publish_ack(out.ack);
  if (out.start_update) {
    if (updater.start(out.update)) {
      update_cmd = out.ack.cmd_id;
      update_request = out.update;
      Serial.printf("[update] downloading %s\n", out.update.url.c_str());
    } else {
      out.ack.status = "error";
      out.ack.detail = "the update could not be started";
      publish_ack(out.ack);
    }
  }
}

// Connected: accept an image on trial, answer an update the previous image started.
void after_connect() {
  if (on_trial) {
    accept_running_image();
    on_trial = false;
    Serial.println("[update] the new image reached the broker: kept");
  }
  if (landed_cmd.empty()) return;
  egiz::Ack ack;
  ack.cmd_id = landed_cmd;
  if (landed_ok) {
    ack.properties = {{"url", egiz::Value::of_text(landed_url)},
                      {"sha256", egiz::Value::of_text(landed_sha)},
                      {"fw", egiz::Value::of_text(kFw)}};
  } else {
    ack.status = "error";
    ack.detail = std::string("the new image did not start; running ") + kFw + " again";
  }
  publish_ack(ack);
  for (const char* key : {"ota_cmd", "ota_part", "ota_url", "ota_sha"}) nvs.remove(key);
  landed_cmd.clear();
}

void on_link_event(const LinkEvent& e, uint32_t now) {
  switch (e.kind) {
    case LinkEvent::Connected:
      connected = true;
      credentials_refused = false;
      backoff.reset();
      failures = 0;
      reconnect_waiting = false;
      digitalWrite(board::kLed, HIGH);
      link.subscribe_commands();
      link.publish(egiz::status_topic(prov.topic_prefix), egiz::encode_status(true, kFw, clock_set() ? epoch_s() : -1),
                   true);
      Serial.println("[mqtt] connected");
      after_connect();
      break;
    case LinkEvent::Disconnected:
      if (connected) Serial.println("[mqtt] connection lost; readings are kept until it is back");
      connected = false;
      digitalWrite(board::kLed, LOW);
      uplink->connection_lost();
      ++failures;
      reconnect_waiting = true;
      reconnect_at = now + backoff.next_ms();
      break;
    case LinkEvent::Published:
      uplink->confirmed(e.value);
      break;
    case LinkEvent::Refused:
      if (e.value == MQTT_CONNECTION_REFUSE_BAD_USERNAME || e.value == MQTT_CONNECTION_REFUSE_NOT_AUTHORIZED) {
        credentials_refused = true;
        Serial.println("[mqtt] the broker refused the credentials; waiting for the gateway to provision again");
      } else {
        Serial.printf("[mqtt] the broker refused the connection (code %d)\n", e.value);
      }
      break;
    case LinkEvent::Command:
      on_command(*e.payload);
      delete e.payload;
      break;
  }
}

void maintain_link(uint32_t now) {
  if (restart_link) {
    restart_link = false;
    backoff.reset();
    failures = 0;
    configure_time();
    start_link();
    return;
  }
  if (!provisioned || !link.started() || connected) return;
  if (!reconnect_waiting) {
    // No outcome of the last attempt for two minutes: start the client over.
    if (now - last_attempt > 120000) start_link();
    return;
  }
  if (static_cast<int32_t>(now - reconnect_at) < 0) return;
  reconnect_waiting = false;
  last_attempt = now;
  if (failures % board::kRediscoverAfter == 0 && rediscover()) return;
  if (!link.reconnect()) start_link();
}

// One message to the broker when the previous one is confirmed.
void pump_uplink(uint32_t now) {
  if (!connected || !uplink) return;
  const egiz::Outgoing* m = uplink->next(*ring, now);
  if (!m) return;
  int id = link.publish(m->topic, m->payload, false);
  if (id < 0) uplink->publish_failed();
  else uplink->published(id, now);
}

// ------------------------------------------------------------------------------------------ readings
void keep(const Reading& r) {
  size_t dropped = 0;
  egiz::Properties props = egiz::without_failed_values(r.properties, &dropped);
  if (props.empty()) return;
  std::string err;
  if (!egiz::check_properties(props, err)) {
    Serial.printf("[sensors] %s reading not kept: %s\n", r.feature.c_str(), err.c_str());
    return;
  }
  ring->push(r.feature, r.ts_ms, egiz::encode_properties(props));
}

void sample(uint32_t now) {
  fresh.clear();
  if (clock_set() && ticker.due(now)) {  // no readings until NTP has set the clock (1970 would be refused)
    int64_t ts = epoch_ms();
    sensors.start_round(ts, setpoint_in_thermal(), settings.setpoint, now);
    if (board::kProduction) fresh.push_back(machine.take(ts, now));
  }
  sensors.poll(now, fresh);
  for (const auto& r : fresh) keep(r);
}

// ------------------------------------------------------------------------------------------ provisioning endpoint
void send_json(int code, const std::string& body) { http.send(code, "application/json", body.c_str()); }

void on_info() { send_json(200, egiz::encode_info({node_id, node_type, kFw, node_mac, provisioned})); }

void on_provision() {
  const String& body = http.arg("plain");
  if (body.length() > egiz::kMaxProvisioningBytes) {
    send_json(413, egiz::encode_http_result(false, "the document is too large"));
    return;
  }
  egiz::Provisioning offered;
  std::string err;
  if (!egiz::parse_provisioning(body.c_str(), offered, err)) {
    send_json(400, egiz::encode_http_result(false, err));
    return;
  }
  switch (egiz::provision_verdict(provisioned ? &prov : nullptr, offered, credentials_refused)) {
    case egiz::ProvisionVerdict::Refuse:
      send_json(409, egiz::encode_http_result(false, "already provisioned and connected; hold BOOT at power-up to reset"));
      return;
    case egiz::ProvisionVerdict::Unchanged:
      send_json(200, egiz::encode_http_result(true));
      return;
    case egiz::ProvisionVerdict::Accept:
      nvs.putString("prov", egiz::encode_provisioning(offered).c_str());
      prov = offered;
      provisioned = true;
      credentials_refused = false;
      restart_link = true;  // connect with them from loop(), after this answer has gone out
      Serial.printf("[setup] provisioned by gateway %s of site %s\n", prov.gateway.c_str(), prov.site.c_str());
      send_json(200, egiz::encode_http_result(true));
      return;
  }
}

// ------------------------------------------------------------------------------------------ updates
void remember_update_outcome() {
  landed_cmd = nvs.getString("ota_cmd", "").c_str();
  if (!landed_cmd.empty()) {
    landed_ok = running_partition() == nvs.getString("ota_part", "").c_str();
    landed_url = nvs.getString("ota_url", "").c_str();
    landed_sha = nvs.getString("ota_sha", "").c_str();
  }
  on_trial = running_image_on_trial();
  trial_started = millis();
  if (on_trial) Serial.println("[update] new image on trial: it is kept once it reaches the broker");
  if (!rollback_supported()) Serial.println("[update] this build has no app rollback: a failed update is not undone");
}

void on_update_finished(const UpdateResult& r, uint32_t now) {
  egiz::Ack ack;
  ack.cmd_id = update_cmd;
  if (!r.ok) {
    ack.status = "error";
    ack.detail = r.detail;
    publish_ack(ack);
    Serial.printf("[update] failed: %s\n", r.detail.c_str());
    return;
  }
  // Answered by the image that runs after the restart: "ok" from the new one once it reaches the
  // broker, "error" from this one if the bootloader comes back to it.
  nvs.putString("ota_cmd", update_cmd.c_str());
  nvs.putString("ota_part", r.partition.c_str());
  nvs.putString("ota_url", update_request.url.c_str());
  nvs.putString("ota_sha", update_request.sha256.c_str());
  if (connected) link.publish(egiz::status_topic(prov.topic_prefix), egiz::encode_status(false, kFw, epoch_s()), true);
  Serial.printf("[update] verified and written to %s; restarting\n", r.partition.c_str());
  restart_pending = true;
  restart_at = now + 1500;  // let the status message leave
}

void report(uint32_t now) {
  if (now - last_report < 60000) return;
  last_report = now;
  Serial.printf("[node] %s %s: broker %s, %u readings waiting (%u dropped), seq %llu, heap %u, failed reads %u\n",
                node_id.c_str(), kFw, connected ? "connected" : "not connected", static_cast<unsigned>(ring->size()),
                static_cast<unsigned>(ring->dropped()), static_cast<unsigned long long>(uplink->last_seq()),
                static_cast<unsigned>(ESP.getFreeHeap()), static_cast<unsigned>(sensors.failed_reads()));
}

}  // namespace

void setup() {
  Serial.begin(115200);
  pinMode(board::kSetupButton, INPUT_PULLUP);
  pinMode(board::kLed, OUTPUT);
  digitalWrite(board::kLed, LOW);
  WiFi.mode(WIFI_STA);
  load_identity();
  Serial.printf("\n[node] OpenEgiz Edge node %s, %s (%s), MAC %s\n", kFw, node_id.c_str(), node_type.c_str(),
                node_mac.c_str());
  connect_wifi();

  // The radio is on now, so esp_random() is truly random; the boot counter makes the id unique anyway.
  uint32_t boots = nvs.getUInt("boots", 0) + 1;
  nvs.putUInt("boots", boots);
  boot_id = egiz::make_boot_id(boots, esp_random(), esp_random());
  backoff = egiz::Backoff(board::kBackoffBaseMs, board::kBackoffCapMs, esp_random());
  ring.reset(new egiz::ReadingRing(board::kRingBytes));
  egiz::UplinkLimits limits;
  limits.max_samples = board::kMaxSamplesPerMessage;
  limits.max_payload_bytes = board::kMaxPayloadBytes;
  limits.confirm_timeout_ms = board::kConfirmTimeoutMs;
  uplink.reset(new egiz::Uplink(boot_id, limits));

  configure_time();
  sensors.begin(profile->thermal_feature);
  if (board::kProduction) machine.begin();
  advertise();
  http.on("/info", HTTP_GET, on_info);
  http.on("/provision", HTTP_POST, on_provision);
  http.onNotFound([]() { send_json(404, egiz::encode_http_result(false, "not found")); });
  http.begin();
  remember_update_outcome();
  ticker.set_interval(settings.interval_ms, millis());
  if (provisioned) {
    start_link();
  } else {
    Serial.printf("[setup] waiting to be provisioned: approve %s on the gateway (egiz nodes approve %s)\n",
                  node_id.c_str(), node_id.c_str());
  }
  Serial.printf("[node] boot %s, sampling every %u ms, free heap %u bytes\n", boot_id.c_str(),
                static_cast<unsigned>(settings.interval_ms), static_cast<unsigned>(ESP.getFreeHeap()));
  // A loop() stuck for seconds resets the node (and, on trial, rolls the update back). The framework's
  // watchdog only logs by default; make it reset.
#if ESP_IDF_VERSION_MAJOR < 5
  esp_task_wdt_init(board::kWatchdogS, true);
#endif
  enableLoopWDT();
}

void loop() {
  uint32_t now = millis();
  http.handleClient();
  LinkEvent e;
  while (link.poll(e)) on_link_event(e, now);
  UpdateResult result;
  if (updater.poll(result)) on_update_finished(result, now);
  if (restart_pending && static_cast<int32_t>(now - restart_at) >= 0) {
    link.stop();
    ESP.restart();
  }
  if (on_trial && now - trial_started > board::kUpdateTrialMs) {
    Serial.println("[update] the new image did not reach the broker in time: rolling back");
    reject_running_image();
  }
  maintain_link(now);
  sample(now);
  pump_uplink(now);
  report(now);
  delay(1);  // let Wi-Fi and the idle loop run
}
