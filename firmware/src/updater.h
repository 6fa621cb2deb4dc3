// Firmware updates from a URL the gateway gives (an `ota` command): downloaded in a thread of their own
// into the other app slot while the node keeps sampling and publishing, hashed on the way, and made
// the boot image only if the SHA-256 matches and ESP-IDF validates the image. The new image then runs
// "on trial": it is kept only once it has reached the broker (accept_running_image); if it crashes,
// hangs or cannot connect, the bootloader returns to the previous image (app rollback).
#pragma once

#include <atomic>
#include <string>

#include "egiz/commands.h"

struct UpdateResult {
  bool ok = false;
  std::string detail;     // why it failed, for the ack
  std::string partition;  // the slot the new image was written to
};

class Updater {
 public:
  // Start the download. False when one is already running or the thread could not start.
  bool start(const egiz::OtaRequest& request);
  bool busy() const { return running_.load(); }
  // The result, once, when the download has finished.
  bool poll(UpdateResult& out);

 private:
  static void entry(void* self);
  UpdateResult run();

  egiz::OtaRequest request_;
  UpdateResult result_;
  std::atomic<bool> running_{false};
  std::atomic<bool> finished_{false};
};

// This image is on trial: the first boot after an update, not yet accepted.
bool running_image_on_trial();
// Keep this image (it reached the broker); no rollback any more.
void accept_running_image();
// Give up on this image: mark it invalid and reboot into the previous one.
void reject_running_image();
// Whether this build has app rollback (the framework's CONFIG_APP_ROLLBACK_ENABLE); without it a new
// image that fails is not replaced by the previous one.
bool rollback_supported();
// The label of the slot this image runs from ("app0", "app1").
std::string running_partition();
