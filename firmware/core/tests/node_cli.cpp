// `core_tests answer TYPE`: the node's command handling on the host. Reads one message of the `cmd`
// topic on stdin (as the gateway published it), prints the payload the node answers with on
// `cmd/ack`, or exits with 3 when there is nothing to answer. The gateway's tests use it to run real
// commands from a real gateway through this code.
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>

#include "egiz/commands.h"

int answer_main(int argc, char** argv) {
  const egiz::TypeProfile* profile = argc > 1 ? egiz::profile_for(argv[1]) : nullptr;
  if (!profile) {
    std::fprintf(stderr, "usage: core_tests answer oven|mixer|conveyor|proofer|cooler < command.json\n");
    return 2;
  }
  std::string payload((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  egiz::NodeSettings settings = egiz::NodeSettings::defaults(*profile);
  egiz::RecentCommands recent;
  egiz::CommandOutcome out = egiz::handle_command(payload, *profile, settings, recent, false);
  std::fprintf(stderr, "%s\n", out.note.c_str());
  if (out.start_update) {  // no flash to write here: answer as a node whose update failed at once
    out.ack.status = "error";
    out.ack.detail = "updates are not run on the host";
    out.answer = true;
  }
  if (!out.answer) return 3;
  std::printf("%s\n", egiz::encode_ack(out.ack).c_str());
  return 0;
}
