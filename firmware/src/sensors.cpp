#include "sensors.h"

#include <Adafruit_ADXL345_U.h>
#include <Arduino.h>
#include <DallasTemperature.h>
#include <OneWire.h>
#include <PZEM004Tv30.h>
#include <Wire.h>

#include <cmath>

#include "board.h"

namespace {

OneWire one_wire(board::kOneWire);
DallasTemperature dallas(&one_wire);
Adafruit_ADXL345_Unified accel(345);
PZEM004Tv30* meters[board::kPzemCount] = {};

constexpr uint32_t kMissesBeforeBackingOff = 3;  // then an absent meter is asked every 10th round only
constexpr uint8_t kResolutionBits = 12;          // 1/16 degree, 750 ms per conversion

}  // namespace

void Sensors::begin(const char* thermal_feature) {
  thermal_feature_ = thermal_feature;
  // Each PZEM object (re)starts UART2 on the same pins; they differ by Modbus address only.
  for (int i = 0; i < board::kPzemCount; ++i)
    meters[i] = new PZEM004Tv30(Serial2, board::kPzemRx, board::kPzemTx, board::kPzemFirstAddress + i);
  phases_.assign(board::kPzemCount, egiz::PhaseReading());

  dallas.begin();
  dallas.setWaitForConversion(false);  // request, go on with other work, read when ready
  dallas.setResolution(kResolutionBits);
  conversion_ms_ = static_cast<uint32_t>(dallas.millisToWaitForConversion(kResolutionBits)) + 10;
  uint8_t found = dallas.getDeviceCount();
  for (uint8_t i = 0; i < found && zone_count_ < board::kMaxZones; ++i) {
    if (!dallas.getAddress(zone_address_[zone_count_], i)) continue;
    const uint8_t* a = zone_address_[zone_count_];
    // Zones are numbered in bus search order (by ROM code): label the probes with these addresses.
    Serial.printf("[sensors] zone %u: DS18B20 %02x%02x%02x%02x%02x%02x%02x%02x\n", static_cast<unsigned>(zone_count_),
                  a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
    ++zone_count_;
  }
  if (zone_count_ == 0) Serial.println("[sensors] no DS18B20 probes found: no zone temperatures");

  Wire.begin(board::kI2cSda, board::kI2cScl);
  have_accel_ = accel.begin();
  if (have_accel_) {
    accel.setRange(ADXL345_RANGE_4_G);
    accel.setDataRate(ADXL345_DATARATE_200_HZ);
    Serial.println("[sensors] ADXL345 found: vibration");
  } else {
    Serial.println("[sensors] no ADXL345: no vibration readings");
  }
}

void Sensors::start_round(int64_t ts_ms, bool with_setpoint, double setpoint, uint32_t now_ms) {
  ++rounds_;
  if (next_meter_ < 0) {  // the previous round's meters are done
    next_meter_ = 0;
    electrical_ts_ = ts_ms;
  }
  if (zone_count_ > 0 && !converting_) {  // a conversion still running (very fast sampling) is not restarted
    dallas.requestTemperatures();
    converting_ = true;
    conversion_ready_ms_ = now_ms + conversion_ms_;
    thermal_ts_ = ts_ms;
    with_setpoint_ = with_setpoint;
    setpoint_ = setpoint;
  }
  pending_vibration_ = have_accel_;
  vibration_ts_ = ts_ms;
}

void Sensors::read_meter(size_t i) {
  egiz::PhaseReading& p = phases_[i];
  p = egiz::PhaseReading();
  bool ask = misses_[i] < kMissesBeforeBackingOff || rounds_ % 10 == 0;
  if (!ask || !meters[i]) return;
  // One Modbus transaction fills the library's cache for 200 ms; a meter that does not answer costs
  // its 100 ms timeout once, not once per value.
  float v = meters[i]->voltage();
  if (std::isnan(v)) {
    ++misses_[i];
    ++failed_reads_;
    return;
  }
  misses_[i] = 0;
  p.ok = true;
  p.volts = v;
  p.amps = meters[i]->current();
  p.watts = meters[i]->power();
  p.pf = meters[i]->pf();
}

void Sensors::poll(uint32_t now_ms, std::vector<Reading>& out) {
  if (have_accel_ && now_ms - last_accel_ms_ >= board::kAccelPeriodMs) {
    last_accel_ms_ = now_ms;
    sensors_event_t e;
    if (accel.getEvent(&e)) window_.add(e.acceleration.x, e.acceleration.y, e.acceleration.z);
  }
  if (pending_vibration_) {  // the window since the previous round
    pending_vibration_ = false;
    egiz::Properties props = window_.take();
    if (!props.empty()) out.push_back({"vibration", vibration_ts_, props});
  }
  if (next_meter_ >= 0) {  // one meter per pass
    read_meter(static_cast<size_t>(next_meter_));
    if (++next_meter_ >= board::kPzemCount) {
      next_meter_ = -1;
      egiz::Properties props = egiz::electrical_properties(phases_);
      if (!props.empty()) out.push_back({"electrical", electrical_ts_, props});
    }
    return;
  }
  if (converting_ && static_cast<int32_t>(now_ms - conversion_ready_ms_) >= 0) {
    converting_ = false;
    std::vector<double> zones;
    for (size_t i = 0; i < zone_count_; ++i) {
      float t = dallas.getTempC(zone_address_[i]);  // DEVICE_DISCONNECTED_C (-127) is a failed read
      zones.push_back(t);
    }
    size_t failed = 0;
    egiz::Properties props = egiz::thermal_properties(zones, with_setpoint_, setpoint_, &failed);
    failed_reads_ += static_cast<uint32_t>(failed);
    if (failed) Serial.printf("[sensors] %u zone probe(s) did not answer: zones left out\n", static_cast<unsigned>(failed));
    if (!props.empty()) out.push_back({thermal_feature_, thermal_ts_, props});
  }
}
