#include "machine.h"

#include <Arduino.h>

#include "board.h"

namespace {

// Written by the interrupts, read and cleared under a critical section in take().
volatile uint32_t good_pulses = 0, reject_pulses = 0;
volatile uint32_t good_last_us = 0, reject_last_us = 0;
portMUX_TYPE pulses_mux = portMUX_INITIALIZER_UNLOCKED;

void IRAM_ATTR on_good() {
  uint32_t now = micros();
  if (now - good_last_us < board::kPulseMinUs) return;  // bounce
  good_last_us = now;
  portENTER_CRITICAL_ISR(&pulses_mux);
  good_pulses = good_pulses + 1;
  portEXIT_CRITICAL_ISR(&pulses_mux);
}

void IRAM_ATTR on_reject() {
  uint32_t now = micros();
  if (now - reject_last_us < board::kPulseMinUs) return;
  reject_last_us = now;
  portENTER_CRITICAL_ISR(&pulses_mux);
  reject_pulses = reject_pulses + 1;
  portEXIT_CRITICAL_ISR(&pulses_mux);
}

bool active(int pin) { return digitalRead(pin) == LOW; }  // the outputs pull the input down

}  // namespace

void MachineInputs::begin() {
  for (int pin : {board::kGoodPulse, board::kRejectPulse, board::kRunSignal, board::kFaultSignal,
                  board::kChangeoverSignal})
    pinMode(pin, INPUT_PULLUP);
  attachInterrupt(digitalPinToInterrupt(board::kGoodPulse), on_good, FALLING);
  attachInterrupt(digitalPinToInterrupt(board::kRejectPulse), on_reject, FALLING);
  Serial.printf("[machine] counting good units on GPIO%d, rejects on GPIO%d\n", board::kGoodPulse,
                board::kRejectPulse);
}

Reading MachineInputs::take(int64_t ts_ms, uint32_t now_ms) {
  portENTER_CRITICAL(&pulses_mux);
  uint32_t good = good_pulses, rejected = reject_pulses;
  good_pulses = 0;
  reject_pulses = 0;
  portEXIT_CRITICAL(&pulses_mux);
  egiz::MachineSignals signals;
  signals.run = active(board::kRunSignal);
  signals.fault = active(board::kFaultSignal);
  signals.changeover = active(board::kChangeoverSignal);
  counter_.update(good, rejected, signals, now_ms);
  return Reading{"production", ts_ms, counter_.properties("")};
}
