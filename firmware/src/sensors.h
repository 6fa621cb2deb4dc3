// The chips: PZEM-004T meters (Modbus over UART2), DS18B20 zone probes (OneWire) and an optional
// ADXL345 accelerometer (I2C). What their values become is decided in the core (egiz/readings.h);
// this only reads them, in short steps so loop() never waits long: one meter per pass, temperature
// conversions running while other work goes on, the accelerometer sampled every few milliseconds.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "egiz/payload.h"
#include "egiz/readings.h"

struct Reading {
  std::string feature;
  int64_t ts_ms;
  egiz::Properties properties;
};

class Sensors {
 public:
  // Probe every chip once; a chip that is missing is reported and left out, not retried forever.
  void begin(const char* thermal_feature);
  // Start a sampling round stamped `ts_ms` (epoch milliseconds). The setpoint goes with the zone
  // temperatures when `with_setpoint` (the type's setpoint belongs to the thermal feature).
  void start_round(int64_t ts_ms, bool with_setpoint, double setpoint, uint32_t now_ms);
  // One short step; finished readings are appended to `out`.
  void poll(uint32_t now_ms, std::vector<Reading>& out);

  size_t zones() const { return zone_count_; }
  bool has_accelerometer() const { return have_accel_; }
  uint32_t failed_reads() const { return failed_reads_; }

 private:
  void read_meter(size_t i);

  std::string thermal_feature_;
  // electrical
  std::vector<egiz::PhaseReading> phases_;
  uint32_t misses_[3] = {0, 0, 0};
  int next_meter_ = -1;  // -1: no electrical round running
  int64_t electrical_ts_ = 0;
  uint32_t rounds_ = 0;
  // thermal
  size_t zone_count_ = 0;
  uint8_t zone_address_[8][8] = {};
  bool converting_ = false;
  uint32_t conversion_ready_ms_ = 0, conversion_ms_ = 750;
  int64_t thermal_ts_ = 0;
  bool with_setpoint_ = false;
  double setpoint_ = 0;
  // vibration
  bool have_accel_ = false;
  bool pending_vibration_ = false;
  int64_t vibration_ts_ = 0;
  uint32_t last_accel_ms_ = 0;
  egiz::VibrationWindow window_;
  uint32_t failed_reads_ = 0;
};
