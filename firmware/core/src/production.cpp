#include "egiz/production.h"

namespace egiz {

void ProductionCounter::update(uint32_t good_pulses, uint32_t reject_pulses, const MachineSignals& signals,
                               uint32_t now_ms) {
  good_ = static_cast<uint32_t>((static_cast<uint64_t>(good_) + good_pulses) % kCounterModulus);
  reject_ = static_cast<uint32_t>((static_cast<uint64_t>(reject_) + reject_pulses) % kCounterModulus);
  bool operating = signals.run && !signals.fault && !signals.changeover;
  if (good_pulses + reject_pulses > 0 || (operating && !was_running_)) last_unit_ms_ = now_ms;
  was_running_ = operating;
  if (signals.fault)
    state_ = "down";
  else if (signals.changeover)
    state_ = "changeover";
  else if (!signals.run)
    state_ = "idle";
  else if (now_ms - last_unit_ms_ >= microstop_after_ms_)
    state_ = "down";
  else
    state_ = "running";
}

Properties ProductionCounter::properties(const std::string& recipe) const {
  Properties out{{"state", Value::of_text(state_)},
                 {"good_count", Value::of(good_)},
                 {"reject_count", Value::of(reject_)}};
  if (!recipe.empty()) out.emplace_back("recipe", Value::of_text(recipe.substr(0, kMaxStringChars)));
  return out;
}

}  // namespace egiz
