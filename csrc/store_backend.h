// The narrow interface between the store's request logic (store.cpp) and its I/O backends: a backend runs
// one pread/pwrite-shaped operation at a time per Io and reports the raw result (bytes or -errno) to the sink.
// Backends never retry, split or interpret results; all of that lives in Store::io_done, so both backends
// have identical semantics by construction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace offload {

struct Io {
  int fd = -1;
  bool write = false;
  uint8_t* buf = nullptr;  // remaining range of the current phase: buf/off/len advance on short transfers
  uint64_t off = 0;
  uint64_t len = 0;
  uint64_t xfer = 0;  // bytes to ask of this operation (< len when a short-transfer fault is armed)
  int fault_err = 0;  // > 0: the backend completes the operation with -fault_err where it produces results
};

class IoSink {
 public:
  virtual ~IoSink() = default;
  // Called on a backend thread, once per submitted Io; may submit again from inside (retries, RMW phases).
  virtual void io_done(Io* io, int64_t res) noexcept = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Never blocks on I/O and never fails: every failure arrives through io_done. The caller bounds the number
  // of Io in flight to the queue depth the backend was built for.
  virtual void submit(Io* io) noexcept = 0;
  virtual bool register_buffer(void* p, size_t n) { return false; }
  // Test hook (io_uring only: io_uring_enter is a raw syscall, not a libc call an interposer could fail): the
  // next `submits` submissions and the next `waits` completion waits return -err without entering the kernel,
  // exactly as an interrupted or refused io_uring_enter does. False where the backend has no such call.
  virtual bool inject_enter_fault(int err, unsigned submits, unsigned waits) { return false; }
  virtual unsigned enter_faults_armed() const { return 0; }
  // Called once no Io is in flight: joins the backend's threads.
  virtual void stop() noexcept = 0;
};

std::unique_ptr<Backend> make_thread_backend(IoSink* sink, unsigned threads);
// nullptr with *err set (positive errno) when io_uring is not compiled in or the ring cannot be set up.
std::unique_ptr<Backend> make_uring_backend(IoSink* sink, unsigned queue_depth, int* err);

// store_files.cpp: run directories, reclaim, backing files. Each returns 0 or -errno.
struct RunDir {
  std::string path;
  int lock_fd = -1;
};
int check_dir_writable(const std::string& dir);
unsigned reclaim_dead_runs(const std::string& dir);
int make_run_dir(const std::string& dir, RunDir* out);
void remove_run_dir(RunDir* rd) noexcept;
int create_backing_file(const std::string& path, bool direct, uint64_t size, int* fd_out);

}  // namespace offload
