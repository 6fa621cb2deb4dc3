// Reconnect delays: exponential from `base_ms`, capped at `cap_ms`, with "equal jitter" (half of the
// step fixed, half random) so the nodes of a line that lost the broker together do not all come back
// in the same instant. Deterministic for a given seed (xorshift32), so the host tests check exact
// sequences; on the ESP32 the seed comes from the hardware random number generator.
#pragma once

#include <cstdint>

namespace egiz {

class Backoff {
 public:
  Backoff(uint32_t base_ms, uint32_t cap_ms, uint32_t seed)
      : base_ms_(base_ms ? base_ms : 1), cap_ms_(cap_ms < base_ms_ ? base_ms_ : cap_ms), state_(seed ? seed : 0x9E3779B9u) {}

  // The delay before the next attempt; each call is one more failed attempt.
  uint32_t next_ms() {
    uint64_t step = static_cast<uint64_t>(base_ms_) << (attempt_ < 32 ? attempt_ : 32);
    if (step > cap_ms_) step = cap_ms_;
    if (attempt_ < 0xFFFFFFFFu) ++attempt_;
    uint32_t half = static_cast<uint32_t>(step / 2);
    uint32_t spread = static_cast<uint32_t>(step) - half;  // the random part: 0..spread
    return half + (spread ? random() % (spread + 1) : 0);
  }
  // Connected: the next failure starts from `base_ms` again.
  void reset() { attempt_ = 0; }
  uint32_t attempts() const { return attempt_; }

 private:
  uint32_t random() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 17;
    state_ ^= state_ << 5;
    return state_;
  }
  uint32_t base_ms_, cap_ms_, state_;
  uint32_t attempt_ = 0;
};

}  // namespace egiz
