// Production counters and state: 16-bit rollover, microstops, the precedence of the machine's signals,
// and a payload the gateway accepts with the property names its OEE reads (as the simulator sends).
#include "check.h"
#include "egiz/payload.h"
#include "egiz/production.h"

using namespace egiz;

TEST_SUITE(production_counters) {
  ProductionCounter c;
  MachineSignals running{true, false, false};
  c.update(0, 0, running, 1000);
  CHECK_EQ(std::string(c.state()), std::string("running"));
  c.update(65530, 3, running, 2000);
  c.update(10, 1, running, 3000);  // the good counter rolls over like a PLC word
  CHECK_EQ(c.good_count(), 4u);
  CHECK_EQ(c.reject_count(), 4u);
  for (int i = 0; i < 3; ++i) c.update(40000, 0, running, 4000 + static_cast<uint32_t>(i));
  CHECK_EQ(c.good_count(), static_cast<uint32_t>((4u + 120000u) % kCounterModulus));
  CHECK(c.good_count() < kCounterModulus && c.reject_count() < kCounterModulus);
}

TEST_SUITE(production_state) {
  ProductionCounter c(10000);
  MachineSignals off{false, false, false}, run{true, false, false};
  c.update(0, 0, off, 0);
  CHECK_EQ(std::string(c.state()), std::string("idle"));
  c.update(0, 0, run, 50000);  // just started: running, not a microstop
  CHECK_EQ(std::string(c.state()), std::string("running"));
  c.update(0, 0, run, 59999);
  CHECK_EQ(std::string(c.state()), std::string("running"));
  c.update(0, 0, run, 60000);  // running without a unit for 10 s: a jam
  CHECK_EQ(std::string(c.state()), std::string("down"));
  c.update(1, 0, run, 61000);  // the jam cleared
  CHECK_EQ(std::string(c.state()), std::string("running"));
  c.update(0, 0, MachineSignals{true, false, true}, 62000);
  CHECK_EQ(std::string(c.state()), std::string("changeover"));
  c.update(0, 0, MachineSignals{true, true, true}, 63000);  // a fault wins over everything
  CHECK_EQ(std::string(c.state()), std::string("down"));
  c.update(0, 0, run, 64000);  // back from the changeover: its first unit is still to come
  CHECK_EQ(std::string(c.state()), std::string("running"));
  ProductionCounter wrap(10000);  // millis() wraps after 49 days
  wrap.update(1, 0, run, 0xFFFFF000u);
  wrap.update(0, 0, run, 0x00000800u);
  CHECK_EQ(std::string(wrap.state()), std::string("running"));
  wrap.update(0, 0, run, 0x00003000u);
  CHECK_EQ(std::string(wrap.state()), std::string("down"));
}

TEST_SUITE(production_payload) {
  ProductionCounter c;
  c.update(40211, 388, MachineSignals{true, false, false}, 1000);
  Properties props = c.properties("croissant");
  std::string error;
  CHECK(check_properties(props, error));
  CHECK_EQ(encode_properties(props),
           std::string("{\"state\":\"running\",\"good_count\":40211,\"reject_count\":388,\"recipe\":\"croissant\"}"));
  CHECK_EQ(encode_properties(c.properties("")),
           std::string("{\"state\":\"running\",\"good_count\":40211,\"reject_count\":388}"));
  CHECK(check_properties(c.properties(std::string(1000, 'r')), error));  // a long recipe is cut to the limit
}
