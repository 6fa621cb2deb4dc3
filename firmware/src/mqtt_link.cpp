#include "mqtt_link.h"

#include <cstring>

#include "board.h"

#include "egiz/commands.h"

namespace {
constexpr int kEventQueueLength = 24;
constexpr int kInBufferBytes = 4096;          // one whole command (egiz::kMaxCommandBytes) fits in one event
constexpr int kOutBufferBytes = static_cast<int>(board::kMaxPayloadBytes) + 512;  // a whole message and its topic
}  // namespace

void MqttLink::start(const std::string& uri, const std::string& client_id, const std::string& username,
                     const std::string& password, const std::string& will_topic, const std::string& will_payload,
                     const std::string& command_topic) {
  stop();
  if (!events_) events_ = xQueueCreate(kEventQueueLength, sizeof(LinkEvent));
  uri_ = uri;
  client_id_ = client_id;
  username_ = username;
  password_ = password;
  will_topic_ = will_topic;
  will_ = will_payload;
  command_topic_ = command_topic;

  esp_mqtt_client_config_t cfg = {};
  cfg.uri = uri_.c_str();
  cfg.client_id = client_id_.c_str();
  cfg.username = username_.c_str();
  cfg.password = password_.c_str();
  cfg.lwt_topic = will_topic_.c_str();
  cfg.lwt_msg = will_.c_str();
  cfg.lwt_msg_len = static_cast<int>(will_.size());
  cfg.lwt_qos = 1;
  cfg.lwt_retain = 1;
  cfg.keepalive = 15;                 // the broker notices a dead node in ~22 s and publishes the Will
  cfg.disable_auto_reconnect = true;  // reconnects follow the node's backoff (egiz/backoff.h)
  cfg.buffer_size = kInBufferBytes;
  cfg.out_buffer_size = kOutBufferBytes;
  cfg.network_timeout_ms = 3000;      // a publish from loop() waits at most this long on a stuck socket
  client_ = esp_mqtt_client_init(&cfg);
  if (!client_) {
    Serial.println("[mqtt] could not create the client");
    return;
  }
  esp_mqtt_client_register_event(client_, static_cast<esp_mqtt_event_id_t>(ESP_EVENT_ANY_ID), &MqttLink::on_event,
                                 this);
  esp_mqtt_client_start(client_);
}

void MqttLink::stop() {
  if (!client_) return;
  esp_mqtt_client_stop(client_);
  esp_mqtt_client_destroy(client_);
  client_ = nullptr;
  LinkEvent e;
  while (poll(e)) delete e.payload;  // events of the old connection mean nothing now
}

bool MqttLink::reconnect() { return client_ && esp_mqtt_client_reconnect(client_) == ESP_OK; }

// Written to the socket now, from loop(): esp_mqtt_client_enqueue() would wait for the client thread's
// next poll (up to a second) and send one queued message per poll. The PUBACK arrives as an event.
int MqttLink::publish(const std::string& topic, const std::string& payload, bool retain) {
  if (!client_) return -1;
  return esp_mqtt_client_publish(client_, topic.c_str(), payload.data(), static_cast<int>(payload.size()), 1,
                                 retain ? 1 : 0);
}

bool MqttLink::subscribe_commands() {
  return client_ && esp_mqtt_client_subscribe(client_, command_topic_.c_str(), 1) >= 0;
}

bool MqttLink::poll(LinkEvent& e) { return events_ && xQueueReceive(events_, &e, 0) == pdTRUE; }

void MqttLink::push(const LinkEvent& e) {
  if (!events_ || xQueueSend(events_, &e, 0) != pdTRUE) delete e.payload;  // loop() is far behind: drop it
}

// Runs in esp-mqtt's thread: copy what matters into the queue and return at once.
void MqttLink::on_event(void* self, esp_event_base_t, int32_t id, void* data) {
  auto* link = static_cast<MqttLink*>(self);
  auto* e = static_cast<esp_mqtt_event_handle_t>(data);
  switch (static_cast<esp_mqtt_event_id_t>(id)) {
    case MQTT_EVENT_CONNECTED:
      link->push({LinkEvent::Connected, 0, nullptr});
      break;
    case MQTT_EVENT_DISCONNECTED:
      link->push({LinkEvent::Disconnected, 0, nullptr});
      break;
    case MQTT_EVENT_PUBLISHED:
      link->push({LinkEvent::Published, e->msg_id, nullptr});
      break;
    case MQTT_EVENT_ERROR:
      if (e->error_handle && e->error_handle->error_type == MQTT_ERROR_TYPE_CONNECTION_REFUSED)
        link->push({LinkEvent::Refused, static_cast<int>(e->error_handle->connect_return_code), nullptr});
      break;
    case MQTT_EVENT_DATA: {
      // Only whole messages on the command topic (a command is far smaller than the buffer).
      bool whole = e->current_data_offset == 0 && e->data_len == e->total_data_len;
      bool ours = e->topic_len == static_cast<int>(link->command_topic_.size()) &&
                  std::memcmp(e->topic, link->command_topic_.data(), link->command_topic_.size()) == 0;
      if (whole && ours && e->data_len <= static_cast<int>(egiz::kMaxCommandBytes))
        link->push({LinkEvent::Command, 0, new std::string(e->data, static_cast<size_t>(e->data_len))});
      break;
    }
    default:
      break;
  }
}
