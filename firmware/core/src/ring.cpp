#include "egiz/ring.h"

#include <cstring>

namespace egiz {

ReadingRing::ReadingRing(size_t capacity_bytes) : buf_(capacity_bytes < kHeader + 1 ? kHeader + 1 : capacity_bytes) {}

void ReadingRing::write(size_t at, const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  at %= buf_.size();
  size_t first = n < buf_.size() - at ? n : buf_.size() - at;
  std::memcpy(buf_.data() + at, p, first);
  if (n > first) std::memcpy(buf_.data(), p + first, n - first);
}

void ReadingRing::read(size_t at, void* data, size_t n) const {
  uint8_t* p = static_cast<uint8_t*>(data);
  at %= buf_.size();
  size_t first = n < buf_.size() - at ? n : buf_.size() - at;
  std::memcpy(p, buf_.data() + at, first);
  if (n > first) std::memcpy(p + first, buf_.data(), n - first);
}

size_t ReadingRing::record_size(size_t at) const {
  uint8_t len[2];
  read(at, len, 2);
  return static_cast<size_t>(len[0]) | (static_cast<size_t>(len[1]) << 8);
}

StoredReading ReadingRing::decode(size_t at) const {
  size_t size = record_size(at);
  uint8_t feature_len;
  read(at + 2, &feature_len, 1);
  uint8_t ts[8];
  read(at + 3, ts, 8);
  uint64_t t = 0;
  for (int k = 7; k >= 0; --k) t = (t << 8) | ts[k];
  StoredReading r;
  r.ts_ms = static_cast<int64_t>(t);
  r.feature.resize(feature_len);
  if (feature_len) read(at + kHeader, &r.feature[0], feature_len);
  r.properties.resize(size - kHeader - feature_len);
  if (!r.properties.empty()) read(at + kHeader + feature_len, &r.properties[0], r.properties.size());
  return r;
}

void ReadingRing::drop_oldest() {
  size_t size = record_size(head_);
  head_ = (head_ + size) % buf_.size();
  used_ -= size;
  --count_;
  ++dropped_;
}

bool ReadingRing::push(const std::string& feature, int64_t ts_ms, const std::string& properties) {
  if (feature.empty() || feature.size() > kMaxFeature || properties.size() > kMaxProperties) return false;
  size_t size = kHeader + feature.size() + properties.size();
  if (size > buf_.size()) return false;
  while (buf_.size() - used_ < size) drop_oldest();
  size_t at = (head_ + used_) % buf_.size();
  uint8_t header[kHeader];
  header[0] = static_cast<uint8_t>(size & 0xFF);
  header[1] = static_cast<uint8_t>(size >> 8);
  header[2] = static_cast<uint8_t>(feature.size());
  uint64_t t = static_cast<uint64_t>(ts_ms);
  for (int k = 0; k < 8; ++k) header[3 + k] = static_cast<uint8_t>(t >> (8 * k));
  write(at, header, kHeader);
  write(at + kHeader, feature.data(), feature.size());
  write(at + kHeader + feature.size(), properties.data(), properties.size());
  used_ += size;
  ++count_;
  return true;
}

std::vector<StoredReading> ReadingRing::take_batch(size_t max_samples, size_t max_bytes, size_t overhead_per_sample) {
  std::vector<StoredReading> out;
  if (count_ == 0 || max_samples == 0) return out;
  // Walk every record once, oldest first. Taken records are moved out; the others are copied down to
  // `kept` so they stay contiguous and in order. `kept` never passes the record being read, and each
  // record is read whole before anything is written, so the copy is safe in place.
  size_t read_at = head_, kept = head_, bytes = 0, kept_used = 0, kept_count = 0;
  std::string feature;
  bool full = false;
  std::vector<uint8_t> record;
  for (size_t n = 0, total = count_; n < total; ++n) {
    size_t size = record_size(read_at);
    bool take = false;
    if (!full) {
      if (out.empty()) {
        take = true;
      } else {
        uint8_t feature_len;
        read(read_at + 2, &feature_len, 1);
        if (feature_len == feature.size()) {
          std::string f(feature_len, '\0');
          read(read_at + kHeader, &f[0], feature_len);
          size_t props = size - kHeader - feature_len;
          take = f == feature && bytes + props + overhead_per_sample <= max_bytes;
        }
      }
    }
    if (take) {
      out.push_back(decode(read_at));
      if (out.size() == 1) feature = out.front().feature;
      bytes += out.back().properties.size() + overhead_per_sample;
      full = out.size() >= max_samples || bytes >= max_bytes;
    } else {
      if (kept != read_at) {
        record.resize(size);
        read(read_at, record.data(), size);
        write(kept, record.data(), size);
      }
      kept = (kept + size) % buf_.size();
      kept_used += size;
      ++kept_count;
    }
    read_at = (read_at + size) % buf_.size();
  }
  // The kept records now end at `kept`; they start where the first kept record was copied, which is
  // the old head (records before the first taken one never move).
  used_ = kept_used;
  count_ = kept_count;
  if (count_ == 0) head_ = 0;
  return out;
}

void ReadingRing::clear() {
  head_ = used_ = count_ = 0;
}

}  // namespace egiz
