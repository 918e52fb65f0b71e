// The shared pieces of chunk_work.h.
#include "chunk_work.h"

#include <cinttypes>
#include <cstdio>
#include <thread>

namespace dckpt {
namespace {

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016" PRIx64, v);
  return buf;
}

}  // namespace

Status fail(Kind kind, const Where& where, const std::string& what, const std::string& detail) {
  std::string place;
  if (where.path != nullptr) place += " " + *where.path;
  if (where.buffer >= 0) place += " buffer " + std::to_string(where.buffer);
  if (where.chunk >= 0) place += " chunk " + std::to_string(where.chunk);
  if (where.offset >= 0) place += " at offset " + std::to_string(where.offset);
  std::string msg = what;
  if (!place.empty()) msg += " in" + place;
  if (!detail.empty()) msg += ": " + detail;
  Status s = Status::error(kind, std::move(msg));
  if (where.path != nullptr) s.path = *where.path;
  s.buffer_index = where.buffer;
  s.chunk_index = where.chunk;
  s.offset = where.offset;
  return s;
}

Status hash_mismatch(Kind kind, const Where& where, uint64_t expected, uint64_t actual) {
  Status s = fail(kind, where, kind == Kind::RawHash ? "raw hash mismatch" : "stored hash mismatch",
                  "expected " + hex(expected) + ", got " + hex(actual));
  s.has_hashes = true;
  s.expected = expected;
  s.actual = actual;
  return s;
}

Status io_failure(const Where& where, const std::string& what, int err) {
  return fail(err == kUnexpectedEof ? Kind::OutOfBounds : Kind::Io, where, what, error_text(err));
}

void pace(Clock::time_point start, double duty) {
  if (duty >= 1.0) return;
  std::chrono::duration<double> busy = Clock::now() - start;
  std::this_thread::sleep_for(busy * ((1.0 - duty) / duty));
}

}  // namespace dckpt
