// From sensor values to contract properties, and when to sample. The Arduino layer only reads the
// chips; what the values become (names, units, rounding, what a failed read leaves out) is here and
// tested on the host.
//   electrical: {"voltage":{"a","b","c"}, "current":{"a","b","c"}, "power_factor", "power_kw"}
//   thermal (or climate): {"temperature_zones":[...], "setpoint"}
//   vibration: {"rms", "peak"} in m/s^2
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "egiz/payload.h"

namespace egiz {

// One PZEM-004T (one phase). A meter that did not answer is not ok; non-finite values count as not ok.
struct PhaseReading {
  bool ok = false;
  double volts = 0, amps = 0, watts = 0, pf = 0;
};

// Phases in order a, b, c. Voltages to 0.1 V and currents to 1 mA (the meter's resolution), power_kw
// summed over the phases that answered, power_factor the ratio of their real to apparent power (the
// meters' mean when there is no load). A phase that did not answer is left out of `voltage` and
// `current` (the other letters keep their meaning). Empty when no phase answered.
Properties electrical_properties(const std::vector<PhaseReading>& phases);

// DS18B20 range; -127 (disconnected) and anything outside is a failed read.
constexpr double kProbeMinC = -55.0, kProbeMaxC = 125.0;

// Zone temperatures in bus order as `temperature_zones`, plus the setpoint when `with_setpoint`.
// If any zone failed the whole array is left out (zone indices must keep naming the same probe), and
// `failed` (when given) says how many. Empty when there is nothing to report.
Properties thermal_properties(const std::vector<double>& zones, bool with_setpoint, double setpoint,
                              size_t* failed = nullptr);

// Vibration over one sampling interval from accelerometer samples (m/s^2, three axes). The mean of
// each axis (gravity, mounting tilt) is removed: rms is the root of the summed per-axis variances,
// peak the largest half peak-to-peak swing of one axis.
class VibrationWindow {
 public:
  void add(double x, double y, double z);
  size_t count() const { return n_; }
  // The window's properties, and a new window. Empty (and still reset) when fewer than
  // `min_samples` samples came in.
  Properties take(size_t min_samples = 8);

 private:
  size_t n_ = 0;
  double mean_[3] = {0, 0, 0}, m2_[3] = {0, 0, 0}, lo_[3] = {0, 0, 0}, hi_[3] = {0, 0, 0};
};

// A sampling schedule on millis(): due() is true once per interval, keeping its phase (no drift), and
// survives the 49-day wrap of the millisecond counter. After a stall of more than one interval it
// starts again from now; the missed ticks are counted, not made up.
class Ticker {
 public:
  explicit Ticker(uint32_t interval_ms) : interval_(interval_ms ? interval_ms : 1) {}
  bool due(uint32_t now_ms);
  void set_interval(uint32_t interval_ms, uint32_t now_ms);
  uint32_t interval() const { return interval_; }
  uint32_t skipped() const { return skipped_; }

 private:
  uint32_t interval_;
  uint32_t next_ = 0;
  bool started_ = false;
  uint32_t skipped_ = 0;
};

}  // namespace egiz
