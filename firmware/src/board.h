// Pins, sizes and timings of the reference build (ESP32-DevKitC); README.md shows the wiring.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef EGIZ_FW_VERSION
#define EGIZ_FW_VERSION "0.0.0-dev"
#endif

namespace board {

// PZEM-004T v3 meters, one per phase, on one Modbus bus (UART2) at addresses 1, 2, 3.
constexpr int kPzemRx = 16;  // UART2 RX  <- PZEM TX
constexpr int kPzemTx = 17;  // UART2 TX  -> PZEM RX
constexpr int kPzemCount = 3;
constexpr uint8_t kPzemFirstAddress = 0x01;

constexpr int kOneWire = 4;     // DS18B20 data line, 4.7 kOhm pull-up to 3V3
constexpr size_t kMaxZones = 8;
constexpr int kI2cSda = 21;     // ADXL345 (optional)
constexpr int kI2cScl = 22;
constexpr uint32_t kAccelPeriodMs = 5;  // 200 accelerometer samples per second for the vibration window

// Production counting (build with -DEGIZ_PRODUCTION=1): opto-isolated machine outputs, active low with
// the internal pull-ups. Unit pulses are counted in interrupts (a pulse shorter than kPulseMinUs after
// the previous one is contact bounce); the signals are read at each sampling round.
#ifndef EGIZ_PRODUCTION
#define EGIZ_PRODUCTION 0
#endif
constexpr bool kProduction = EGIZ_PRODUCTION != 0;
constexpr int kGoodPulse = 25;    // one pulse per good unit (the counting light barrier)
constexpr int kRejectPulse = 26;  // one pulse per rejected unit (the reject gate)
constexpr int kRunSignal = 27;    // machine in operation
constexpr int kFaultSignal = 32;  // fault lamp
constexpr int kChangeoverSignal = 33;  // set-up switch
constexpr uint32_t kPulseMinUs = 2000;

constexpr int kSetupButton = 0;  // BOOT: held at power-up = set-up portal, credentials forgotten
constexpr int kLed = 2;          // on: connected to the broker; blinking: set-up portal

constexpr uint16_t kProvisionPort = 8266;  // GET /info, POST /provision; announced over mDNS
constexpr uint32_t kPortalTimeoutS = 600;   // then restart and try the stored Wi-Fi again

// Outage buffer and messages. ~64 KiB keep about 4 minutes of 1 Hz readings of all three features
// (longer at slower sampling); the free heap is printed at start.
constexpr size_t kRingBytes = 64 * 1024;
constexpr size_t kMaxSamplesPerMessage = 50;
constexpr size_t kMaxPayloadBytes = 8192;
constexpr uint32_t kConfirmTimeoutMs = 15000;

constexpr uint32_t kBackoffBaseMs = 1000;  // reconnects: 1 s doubling to 60 s, with jitter
constexpr uint32_t kBackoffCapMs = 60000;
constexpr uint32_t kRediscoverAfter = 3;       // failed attempts before browsing mDNS for the broker
constexpr uint32_t kMdnsQueryMs = 1500;
constexpr uint32_t kUpdateTrialMs = 5 * 60 * 1000;  // a new image must reach the broker within this
constexpr uint32_t kWatchdogS = 8;  // longest loop() pass: an mDNS search (2 x 1.5 s) plus a stuck publish (3 s)

}  // namespace board
