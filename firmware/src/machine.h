// The machine's production signals: good and reject pulses counted in interrupts, the run, fault and
// set-up inputs read once per sampling round. What they become (counters, state) is egiz/production.h.
#pragma once

#include <cstdint>

#include "egiz/production.h"
#include "sensors.h"

class MachineInputs {
 public:
  // Pins as inputs with pull-ups and the pulse interrupts attached; once, in setup().
  void begin();
  // The `production` reading at `ts_ms` (epoch milliseconds): pulses since the last round, state now.
  Reading take(int64_t ts_ms, uint32_t now_ms);

 private:
  egiz::ProductionCounter counter_;
};
