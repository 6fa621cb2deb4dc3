// The readings a node keeps while its broker is unreachable: a ring of fixed size in bytes, allocated
// once, holding each reading as its feature, its time and its already encoded properties (about
// 40-140 bytes for this firmware's features, so a 64 KiB ring holds roughly 700 readings).
//
// When the ring is full the OLDEST readings are dropped, and counted, so the newest survive. Readings
// leave the ring oldest first, in batches of one feature (one topic): take_batch() takes the oldest
// reading and then the following readings of the same feature; readings of other features keep their
// place and order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace egiz {

struct StoredReading {
  std::string feature;
  int64_t ts_ms = 0;       // epoch milliseconds
  std::string properties;  // a JSON object (encode_properties)
};

class ReadingRing {
 public:
  // Largest encoded properties one reading may have (a record's length must fit 16 bits).
  static constexpr size_t kMaxProperties = 8192;
  static constexpr size_t kMaxFeature = 64;

  explicit ReadingRing(size_t capacity_bytes);

  // Keep a reading, dropping the oldest ones if there is no room. False (and nothing dropped) when
  // the reading could never fit: empty or too long a feature, properties over kMaxProperties or
  // larger than the whole ring.
  bool push(const std::string& feature, int64_t ts_ms, const std::string& properties);

  // Remove and return the oldest reading and then, in order, the following readings of its feature,
  // up to `max_samples` and while the properties plus `overhead_per_sample` bytes each stay within
  // `max_bytes` (the first reading is always taken). Empty when the ring is empty.
  std::vector<StoredReading> take_batch(size_t max_samples, size_t max_bytes, size_t overhead_per_sample);

  void clear();
  size_t size() const { return count_; }
  bool empty() const { return count_ == 0; }
  size_t used_bytes() const { return used_; }
  size_t capacity_bytes() const { return buf_.size(); }
  uint32_t dropped() const { return dropped_; }  // readings lost to a full ring since start

 private:
  static constexpr size_t kHeader = 2 + 1 + 8;  // record length, feature length, ts
  void write(size_t at, const void* data, size_t n);
  void read(size_t at, void* data, size_t n) const;
  size_t record_size(size_t at) const;
  StoredReading decode(size_t at) const;
  void drop_oldest();

  std::vector<uint8_t> buf_;
  size_t head_ = 0;  // offset of the oldest record
  size_t used_ = 0;
  size_t count_ = 0;
  uint32_t dropped_ = 0;
};

}  // namespace egiz
