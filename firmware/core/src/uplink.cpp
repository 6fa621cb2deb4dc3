#include "egiz/uplink.h"

#include <algorithm>

#include "egiz/payload.h"
#include "egiz/topics.h"

namespace egiz {

Uplink::Uplink(std::string boot, UplinkLimits limits) : boot_(std::move(boot)), limits_(limits) {
  if (limits_.max_samples == 0) limits_.max_samples = 1;
}

void Uplink::set_topic_prefix(const std::string& prefix) {
  prefix_ = prefix;
  if (has_message_) message_.topic = telemetry_topic(prefix_, feature_);
}

const Outgoing* Uplink::next(ReadingRing& ring, uint32_t now_ms) {
  if (has_message_) {
    if (!sent_) return &message_;
    if (static_cast<int32_t>(now_ms - sent_at_ms_) >= static_cast<int32_t>(limits_.confirm_timeout_ms)) {
      sent_ = false;  // overdue: send it again (the gateway drops the copy it may already have)
      return &message_;
    }
    return nullptr;
  }
  if (prefix_.empty() || ring.empty()) return nullptr;
  size_t head = 32 + boot_.size();  // {"boot":"..","samples":[ ... ]}
  size_t budget = limits_.max_payload_bytes > head ? limits_.max_payload_bytes - head : 0;
  std::vector<StoredReading> taken = ring.take_batch(limits_.max_samples, budget, kSampleOverheadBytes);
  if (taken.empty()) return nullptr;
  std::vector<EncodedSample> samples;
  samples.reserve(taken.size());
  for (auto& r : taken) samples.push_back({static_cast<double>(r.ts_ms) / 1000.0, ++seq_, std::move(r.properties)});
  feature_ = taken.front().feature;
  message_.topic = telemetry_topic(prefix_, feature_);
  message_.payload = samples.size() == 1 ? encode_sample(samples.front(), boot_) : encode_batch(samples, boot_);
  message_.first_seq = samples.front().seq;
  message_.last_seq = samples.back().seq;
  message_.samples = samples.size();
  has_message_ = true;
  sent_ = false;
  msg_ids_.clear();
  return &message_;
}

void Uplink::published(int msg_id, uint32_t now_ms) {
  if (!has_message_) return;
  if (!msg_ids_.empty()) ++resent_;
  sent_ = true;
  sent_at_ms_ = now_ms;
  if (msg_ids_.size() >= 8) msg_ids_.erase(msg_ids_.begin());
  msg_ids_.push_back(msg_id);
}

bool Uplink::confirmed(int msg_id) {
  if (!has_message_ || std::find(msg_ids_.begin(), msg_ids_.end(), msg_id) == msg_ids_.end()) return false;
  confirmed_samples_ += message_.samples;
  has_message_ = sent_ = false;
  msg_ids_.clear();
  message_ = Outgoing();
  return true;
}

void Uplink::connection_lost() { sent_ = false; }

void Uplink::publish_failed() { sent_ = false; }

}  // namespace egiz
