// Shared vocabulary of the native core: error types raised across the binding, alignment helpers, the clock.
// Note [errors]: inside csrc/ low-level functions return negative errno; the first layer that knows the
// coordinates (path, offset, length) throws IoError, which the binding turns into offload.errors.StoreIOError
// (an OSError). Nothing here asserts on I/O or user input, prints, or exits.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <time.h>

namespace offload {

struct IoError : std::runtime_error {
  std::string op;    // "read", "write", "open", "fsync", ...
  std::string path;
  uint64_t offset;
  uint64_t length;
  int err;  // positive errno
  IoError(std::string op_, std::string path_, uint64_t offset_, uint64_t length_, int err_)
      : std::runtime_error(op_ + " " + path_ + " at offset " + std::to_string(offset_) + " length " +
                           std::to_string(length_) + ": " + std::strerror(err_)),
        op(std::move(op_)), path(std::move(path_)), offset(offset_), length(length_), err(err_) {}
};

struct ArenaExhausted : std::runtime_error {
  uint64_t requested, budget, in_use;
  ArenaExhausted(uint64_t requested_, uint64_t budget_, uint64_t in_use_)
      : std::runtime_error("arena exhausted: requested " + std::to_string(requested_) + " bytes, budget " +
                           std::to_string(budget_) + ", in use " + std::to_string(in_use_)),
        requested(requested_), budget(budget_), in_use(in_use_) {}
};

inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
inline uint64_t align_down(uint64_t x, uint64_t a) { return x / a * a; }

// CLOCK_MONOTONIC nanoseconds: the one clock of trace events, native and Python alike.
inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace offload
