#include "updater.h"

#include <Arduino.h>
#include <HTTPClient.h>
#include <WiFi.h>
#include <WiFiClientSecure.h>
#include <esp_ota_ops.h>
#include <freertos/FreeRTOS.h>
#include <freertos/task.h>
#include <mbedtls/sha256.h>
#include <mbedtls/version.h>

#include <cstdio>

namespace {

#if MBEDTLS_VERSION_MAJOR >= 3
int sha_start(mbedtls_sha256_context* c) { return mbedtls_sha256_starts(c, 0); }
int sha_update(mbedtls_sha256_context* c, const uint8_t* d, size_t n) { return mbedtls_sha256_update(c, d, n); }
int sha_finish(mbedtls_sha256_context* c, uint8_t out[32]) { return mbedtls_sha256_finish(c, out); }
#else
int sha_start(mbedtls_sha256_context* c) { return mbedtls_sha256_starts_ret(c, 0); }
int sha_update(mbedtls_sha256_context* c, const uint8_t* d, size_t n) { return mbedtls_sha256_update_ret(c, d, n); }
int sha_finish(mbedtls_sha256_context* c, uint8_t out[32]) { return mbedtls_sha256_finish_ret(c, out); }
#endif

// Where HTTPClient writes the body (it undoes chunked transfer encoding for us): into the OTA slot,
// through the hash.
class OtaSink : public Stream {
 public:
  OtaSink(esp_ota_handle_t handle, size_t limit, mbedtls_sha256_context* sha) : handle_(handle), limit_(limit), sha_(sha) {}
  size_t write(const uint8_t* data, size_t n) override {
    if (failed_ || written_ + n > limit_) {
      failed_ = true;
      return 0;
    }
    if (sha_update(sha_, data, n) != 0 || esp_ota_write(handle_, data, n) != ESP_OK) {
      failed_ = true;
      return 0;
    }
    written_ += n;
    return n;
  }
  size_t write(uint8_t b) override { return write(&b, 1); }
  int available() override { return 0; }
  int read() override { return -1; }
  int peek() override { return -1; }
  void flush() override {}
  size_t written() const { return written_; }
  bool failed() const { return failed_; }

 private:
  esp_ota_handle_t handle_;
  size_t limit_;
  mbedtls_sha256_context* sha_;
  size_t written_ = 0;
  bool failed_ = false;
};

}  // namespace

bool Updater::start(const egiz::OtaRequest& request) {
  bool idle = false;
  if (!running_.compare_exchange_strong(idle, true)) return false;
  request_ = request;
  finished_ = false;
  // Its own thread: a download takes many seconds and loop() must keep sampling and publishing.
  if (xTaskCreatePinnedToCore(&Updater::entry, "egiz-update", 10240, this, 1, nullptr, 1) != pdPASS) {
    running_ = false;
    return false;
  }
  return true;
}

bool Updater::poll(UpdateResult& out) {
  if (!finished_.load()) return false;
  out = result_;
  finished_ = false;
  running_ = false;
  return true;
}

void Updater::entry(void* self) {
  auto* u = static_cast<Updater*>(self);
  u->result_ = u->run();
  u->finished_ = true;
  vTaskDelete(nullptr);
}

UpdateResult Updater::run() {
  UpdateResult r;
  const esp_partition_t* target = esp_ota_get_next_update_partition(nullptr);
  if (!target) {
    r.detail = "no second app slot in the partition table";
    return r;
  }
  r.partition = target->label;
  // TLS without a certificate check is fine here: the SHA-256 came over the node's authenticated MQTT
  // connection and decides whether the image is taken.
  WiFiClient plain;
  WiFiClientSecure secure;
  secure.setInsecure();
  bool https = request_.url.rfind("https://", 0) == 0;
  HTTPClient http;
  http.setTimeout(15000);
  http.setFollowRedirects(HTTPC_STRICT_FOLLOW_REDIRECTS);
  if (!(https ? http.begin(secure, request_.url.c_str()) : http.begin(plain, request_.url.c_str()))) {
    r.detail = "bad URL";
    return r;
  }
  int code = http.GET();
  if (code != HTTP_CODE_OK) {
    String why = code < 0 ? HTTPClient::errorToString(code) : String("HTTP ") + String(code);
    r.detail = std::string("download failed: ") + why.c_str();
    http.end();
    return r;
  }
  int length = http.getSize();  // -1 when chunked
  if (length > 0 && static_cast<size_t>(length) > target->size) {
    r.detail = "the image is larger than the app slot";
    http.end();
    return r;
  }
  esp_ota_handle_t handle = 0;
  esp_err_t err = esp_ota_begin(target, length > 0 ? static_cast<size_t>(length) : OTA_SIZE_UNKNOWN, &handle);
  if (err != ESP_OK) {
    r.detail = std::string("cannot write the app slot: ") + esp_err_to_name(err);
    http.end();
    return r;
  }
  mbedtls_sha256_context sha;
  mbedtls_sha256_init(&sha);
  sha_start(&sha);
  OtaSink sink(handle, target->size, &sha);
  int copied = http.writeToStream(&sink);
  http.end();
  uint8_t digest[32];
  sha_finish(&sha, digest);
  mbedtls_sha256_free(&sha);
  char hex[65];
  for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  bool complete = copied > 0 && !sink.failed() && (length < 0 || sink.written() == static_cast<size_t>(length));
  if (!complete) {
    esp_ota_abort(handle);
    r.detail = "the download broke off after " + std::to_string(sink.written()) + " bytes";
    return r;
  }
  if (request_.sha256 != hex) {  // not the image the gateway named: keep running the current one
    esp_ota_abort(handle);
    r.detail = std::string("SHA-256 mismatch: the download hashes to ") + hex;
    return r;
  }
  err = esp_ota_end(handle);  // checks that it is an app image for this chip
  if (err == ESP_OK) err = esp_ota_set_boot_partition(target);
  if (err != ESP_OK) {
    r.detail = std::string("the image was not accepted: ") + esp_err_to_name(err);
    return r;
  }
  r.ok = true;
  return r;
}

// arduino-esp32 asks this at start: true = this program decides itself whether a new image stays
// (accept_running_image once it reached the broker), instead of accepting it before setup().
extern "C" bool verifyRollbackLater() { return true; }

bool running_image_on_trial() {
  esp_ota_img_states_t state;
  return esp_ota_get_state_partition(esp_ota_get_running_partition(), &state) == ESP_OK &&
         state == ESP_OTA_IMG_PENDING_VERIFY;
}

void accept_running_image() {
  if (running_image_on_trial()) esp_ota_mark_app_valid_cancel_rollback();
}

void reject_running_image() { esp_ota_mark_app_invalid_rollback_and_reboot(); }

bool rollback_supported() {
#ifdef CONFIG_APP_ROLLBACK_ENABLE
  return true;
#else
  return false;
#endif
}

std::string running_partition() {
  const esp_partition_t* p = esp_ota_get_running_partition();
  return p ? p->label : "";
}
