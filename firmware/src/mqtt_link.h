// The broker connection, on ESP-IDF's esp-mqtt client: QoS 1 with broker confirmations (PUBACK) the
// uplink waits for, a retained Last Will, and no automatic reconnect (the node reconnects with its
// own backoff and jitter). esp-mqtt runs its own FreeRTOS thread; its events are copied into a queue here and
// handled in loop(), so no node state is touched from two threads.
#pragma once

#include <Arduino.h>
#include <freertos/FreeRTOS.h>
#include <freertos/queue.h>
#include <mqtt_client.h>

#include <string>

struct LinkEvent {
  enum Kind : uint8_t { Connected, Disconnected, Published, Command, Refused };
  Kind kind;
  int value;             // Published: the msg id; Refused: the CONNACK return code
  std::string* payload;  // Command: the message (the receiver deletes it)
};

class MqttLink {
 public:
  // Create (or re-create, e.g. after new credentials) the client and connect.
  void start(const std::string& uri, const std::string& client_id, const std::string& username,
             const std::string& password, const std::string& will_topic, const std::string& will_payload,
             const std::string& command_topic);
  void stop();
  bool started() const { return client_ != nullptr; }
  // Try again now (after a disconnect). False when the client is not waiting to reconnect.
  bool reconnect();
  // Send a QoS 1 message. The msg id (its PUBACK comes as a Published event), or < 0 when refused.
  int publish(const std::string& topic, const std::string& payload, bool retain);
  bool subscribe_commands();
  // The next event, without waiting.
  bool poll(LinkEvent& e);

 private:
  static void on_event(void* self, esp_event_base_t base, int32_t id, void* data);
  void push(const LinkEvent& e);

  esp_mqtt_client_handle_t client_ = nullptr;
  QueueHandle_t events_ = nullptr;
  // esp-mqtt copies the configuration, but the strings are kept anyway for the lifetime of the client.
  std::string uri_, client_id_, username_, password_, will_topic_, will_, command_topic_;
};
