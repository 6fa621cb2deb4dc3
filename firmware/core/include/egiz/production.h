// What the node reports about production, the way a machine's PLC does (docs/topics.md, "Production
// counters and state"): good and rejected unit counters that roll over at 65,536 (16-bit words), and
// the machine's state (running, down, idle, changeover) from its signals:
//   {"state":"running","good_count":40211,"reject_count":388[,"recipe":"croissant"]}
// The Arduino layer counts pulses in interrupts and reads the signal inputs; everything else is here.
#pragma once

#include <cstdint>
#include <string>

#include "egiz/payload.h"

namespace egiz {

constexpr uint32_t kCounterModulus = 65536;
constexpr uint32_t kMicrostopAfterMs = 10000;  // running, yet no unit for this long: a jam (state "down")

// The machine's signal inputs at one moment.
struct MachineSignals {
  bool run = false;         // the machine's "in operation" output
  bool fault = false;       // its fault lamp: a breakdown
  bool changeover = false;  // the set-up switch: changing recipe or format
};

// Counts units and follows the machine's state. Precedence: fault > changeover > not running (idle)
// > running without units for `microstop_after_ms` (down: a microstop) > running.
class ProductionCounter {
 public:
  explicit ProductionCounter(uint32_t microstop_after_ms = kMicrostopAfterMs)
      : microstop_after_ms_(microstop_after_ms ? microstop_after_ms : 1) {}

  // Pulses counted since the last update (good units, rejects) and the signals now, at `now_ms`
  // (millis(), which wraps after 49 days: only differences are used).
  void update(uint32_t good_pulses, uint32_t reject_pulses, const MachineSignals& signals, uint32_t now_ms);

  const char* state() const { return state_; }
  uint32_t good_count() const { return good_; }
  uint32_t reject_count() const { return reject_; }
  // The `production` feature's properties; `recipe` only when not empty.
  Properties properties(const std::string& recipe) const;

 private:
  uint32_t microstop_after_ms_;
  uint32_t good_ = 0, reject_ = 0;
  uint32_t last_unit_ms_ = 0;  // the last unit, or when the machine last started running
  bool was_running_ = false;
  const char* state_ = "idle";
};

}  // namespace egiz
