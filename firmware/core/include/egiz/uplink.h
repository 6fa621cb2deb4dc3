// What goes to the broker and when: readings leave the ring as messages of one feature (a single
// sample, or the batch form for several), one message in flight at a time. A message is forgotten
// only when the broker has confirmed it (PUBACK); until then it is sent again, byte for byte, after a
// reconnect or when the confirmation is overdue. `seq` is given when a message is formed, +1 per
// sample, so seq rises in the order messages leave, and a repeat carries the same seq and is dropped
// by the gateway as a duplicate: nothing is lost or stored twice.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "egiz/ring.h"

namespace egiz {

struct Outgoing {
  std::string topic;
  std::string payload;
  uint64_t first_seq = 0, last_seq = 0;
  size_t samples = 0;
};

struct UplinkLimits {
  size_t max_samples = 50;            // per message (the gateway accepts up to 1000)
  size_t max_payload_bytes = 8192;    // per message (the gateway accepts up to 65536)
  uint32_t confirm_timeout_ms = 15000;  // send again when no PUBACK came in this time
};

class Uplink {
 public:
  Uplink(std::string boot, UplinkLimits limits = UplinkLimits());

  // Where messages go ("openegiz/{site}/{type}/{id}"); a message in flight is re-addressed too.
  void set_topic_prefix(const std::string& prefix);
  const std::string& boot() const { return boot_; }

  // The message to hand to the MQTT client now, or nullptr (nothing to send, or waiting for the
  // confirmation of the message in flight). Call published() once the client has taken it.
  const Outgoing* next(ReadingRing& ring, uint32_t now_ms);
  void published(int msg_id, uint32_t now_ms);
  // The broker confirmed `msg_id`. True when that completed the message in flight.
  bool confirmed(int msg_id);
  // The connection dropped: the message in flight is sent again after the reconnect.
  void connection_lost();
  // The client refused the message (queue full, not connected): try again on the next call.
  void publish_failed();

  bool in_flight() const { return has_message_; }
  uint64_t last_seq() const { return seq_; }
  uint32_t resent() const { return resent_; }      // messages sent more than once
  uint64_t confirmed_samples() const { return confirmed_samples_; }

 private:
  std::string boot_;
  UplinkLimits limits_;
  std::string prefix_;
  std::string feature_;  // of the message in flight
  Outgoing message_;
  bool has_message_ = false, sent_ = false;
  std::vector<int> msg_ids_;  // every id this message was published under; any PUBACK completes it
  uint32_t sent_at_ms_ = 0;
  uint64_t seq_ = 0;
  uint32_t resent_ = 0;
  uint64_t confirmed_samples_ = 0;
};

}  // namespace egiz
