#include "egiz/readings.h"

#include <cmath>

#include "egiz/commands.h"

namespace egiz {

Properties electrical_properties(const std::vector<PhaseReading>& phases) {
  static const char* const kNames[] = {"a", "b", "c"};
  std::vector<std::pair<std::string, double>> volts, amps;
  double watts = 0, apparent = 0, pf_sum = 0;
  size_t answered = 0;
  for (size_t i = 0; i < phases.size() && i < 3; ++i) {
    const PhaseReading& p = phases[i];
    if (!p.ok || !std::isfinite(p.volts) || !std::isfinite(p.amps) || !std::isfinite(p.watts) || !std::isfinite(p.pf))
      continue;
    volts.emplace_back(kNames[i], round_to(p.volts, 1));
    amps.emplace_back(kNames[i], round_to(p.amps, 3));
    watts += p.watts;
    apparent += p.volts * p.amps;
    pf_sum += p.pf;
    ++answered;
  }
  Properties out;
  if (!answered) return out;
  double pf = apparent >= 1.0 ? watts / apparent : pf_sum / static_cast<double>(answered);
  if (pf < 0) pf = 0;
  if (pf > 1) pf = 1;
  out.emplace_back("voltage", Value::of_named(volts));
  out.emplace_back("current", Value::of_named(amps));
  out.emplace_back("power_factor", Value::of(round_to(pf, 3)));
  out.emplace_back("power_kw", Value::of(round_to(watts / 1000.0, 4)));
  return out;
}

Properties thermal_properties(const std::vector<double>& zones, bool with_setpoint, double setpoint, size_t* failed) {
  Properties out;
  size_t bad = 0;
  std::vector<double> temps;
  for (double t : zones) {
    if (!std::isfinite(t) || t < kProbeMinC || t > kProbeMaxC) ++bad;
    else temps.push_back(round_to(t, 4));
  }
  if (!zones.empty() && bad == 0) out.emplace_back("temperature_zones", Value::of_numbers(temps));
  if (with_setpoint && std::isfinite(setpoint)) out.emplace_back("setpoint", Value::of(setpoint));
  if (failed) *failed = bad;
  return out;
}

void VibrationWindow::add(double x, double y, double z) {
  const double v[3] = {x, y, z};
  for (double a : v)
    if (!std::isfinite(a)) return;  // a failed read: not part of the window
  ++n_;
  for (int k = 0; k < 3; ++k) {  // Welford: stable mean and variance in one pass
    double delta = v[k] - mean_[k];
    mean_[k] += delta / static_cast<double>(n_);
    m2_[k] += delta * (v[k] - mean_[k]);
    if (n_ == 1 || v[k] < lo_[k]) lo_[k] = v[k];
    if (n_ == 1 || v[k] > hi_[k]) hi_[k] = v[k];
  }
}

Properties VibrationWindow::take(size_t min_samples) {
  Properties out;
  if (n_ >= min_samples && n_ >= 2) {
    double var = 0, peak = 0;
    for (int k = 0; k < 3; ++k) {
      var += m2_[k] / static_cast<double>(n_);
      double swing = (hi_[k] - lo_[k]) / 2.0;
      if (swing > peak) peak = swing;
    }
    out.emplace_back("rms", Value::of(round_to(std::sqrt(var), 3)));
    out.emplace_back("peak", Value::of(round_to(peak, 3)));
  }
  *this = VibrationWindow();
  return out;
}

bool Ticker::due(uint32_t now_ms) {
  if (!started_) {
    started_ = true;
    next_ = now_ms + interval_;
    return true;
  }
  int32_t late = static_cast<int32_t>(now_ms - next_);
  if (late < 0) return false;
  if (static_cast<uint32_t>(late) >= interval_) {
    skipped_ += static_cast<uint32_t>(late) / interval_;
    next_ = now_ms + interval_;
  } else {
    next_ += interval_;
  }
  return true;
}

void Ticker::set_interval(uint32_t interval_ms, uint32_t now_ms) {
  interval_ = interval_ms ? interval_ms : 1;
  if (started_) next_ = now_ms + interval_;
}

}  // namespace egiz
