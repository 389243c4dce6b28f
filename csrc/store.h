// NVMe swap store: objects striped over N directories, O_DIRECT where the filesystem accepts it, served by an
// io_uring backend (one ring, one completion thread) or a thread-pool pread/pwrite backend.
// Note [store requests]: a request (one ticket) is cut into sub-requests at stripe boundaries and at 1 MiB of
// file offset; each sub-request holds one of queue_depth slots from dispatch to completion, so at most
// queue_depth operations are ever in a backend (submit blocks for a slot, it never fails for lack of one).
// A sub-request is a small state machine driven by backend completions (Store::io_done): short transfers
// advance and resubmit, EAGAIN/EINTR resubmit, a read-modify-write reads its aligned span before writing it.
// Note [store alignment]: with O_DIRECT, a sub-request whose file offset, length and buffer address are all
// multiples of the path's alignment goes straight to the backend; any other goes through an aligned bounce
// buffer covering [align_down(off), align_up(off + len)). A write that covers its first or last block only
// partially first reads that span (RMW); RMWs are serialised per object, since two writes to disjoint bytes
// of one block would otherwise each write back the other's stale bytes. Backing files are sized to a multiple
// of the alignment, so the span never reaches past the end of the file.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "store_backend.h"

namespace offload {

class TraceRing;

struct StoreOptions {
  std::vector<std::string> paths;
  unsigned queue_depth = 32;
  std::string backend = "auto";  // "auto" | "io_uring" | "threadpool"
  std::string direct = "auto";   // "auto" | "on" | "off"
  uint64_t stripe_bytes = 4u << 20;
  unsigned threads = 4;
  std::shared_ptr<TraceRing> trace;
};

struct DirectProbe {
  bool direct = false;
  uint32_t alignment = 1;
  std::string reason;
};

// Creates and removes a probe file in dir; throws IoError when dir is unusable (missing, not a directory).
DirectProbe probe_direct(const std::string& dir);
int probe_in(const std::string& dir, DirectProbe* out);  // store_files.cpp: 0 or -errno; leaves nothing behind
std::vector<std::string> store_backends();

enum class FaultOp { kAny = 0, kRead = 1, kWrite = 2 };
struct SubReq;

class Store : private IoSink {
 public:
  explicit Store(const StoreOptions& opt);  // throws IoError (op "open") naming the path, or invalid_argument
  ~Store() override;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  uint64_t create(uint64_t nbytes);
  void remove(uint64_t obj);  // waits for the object's in-flight sub-requests
  uint64_t size(uint64_t obj);
  std::vector<std::string> path_of(uint64_t obj);

  // Blocks only for queue slots. The buffer must stay valid until the ticket is waited or the store closes.
  uint64_t submit(bool write, uint64_t obj, uint64_t offset, void* buf, uint64_t len, uint32_t tag);
  void wait(uint64_t ticket);  // throws the ticket's first IoError
  bool poll(uint64_t ticket);
  // Waits for every ticket outstanding at the call, retires them (listed in *retired), then throws the first
  // error among them by ticket order.
  void wait_all(std::vector<uint64_t>* retired);
  void close();  // idempotent; pending errors are dropped with their tickets

  bool register_buffer(void* p, size_t n);
  void inject_fault(uint64_t k, int err, bool short_io, FaultOp op);
  void clear_faults();
  size_t faults_armed();  // armed faults not yet fired
  // The next `submits` io_uring submissions and `waits` completion waits fail with -err (EINTR, EAGAIN or
  // EBUSY: what io_uring_enter returns transiently) before entering the kernel; they must be retried with no
  // request lost. Throws invalid_argument on another errno or the thread-pool backend.
  void inject_enter_fault(int err, unsigned submits, unsigned waits);
  unsigned enter_faults_armed() const { return backend_->enter_faults_armed(); }

  const char* backend_name() const { return backend_->name(); }
  const std::vector<std::string>& run_dirs() const { return run_dirs_; }
  std::vector<bool> direct() const;
  std::vector<uint32_t> alignment() const;
  unsigned queue_depth() const { return qd_; }
  unsigned reclaimed() const { return reclaimed_; }
  bool closed() {
    std::lock_guard<std::mutex> lk(mu_);
    return closed_;
  }

 private:
  struct PathState {
    std::string dir;
    RunDir run;
    bool direct = false;
    uint32_t align = 1;
  };
  struct File {
    int fd = -1;
    std::string path;
  };
  struct Object {
    uint64_t nbytes = 0;
    std::vector<File> files;  // index = path index; only paths holding at least one stripe
    unsigned inflight = 0;    // sub-requests not yet finished (guarded by Store::mu_)
    bool rmw_busy = false;    // Note [store alignment]
    std::deque<SubReq*> rmw_waiting;
    ~Object();
  };
  struct Ticket {
    unsigned pending = 0;
    bool write = false;
    uint32_t tag = 0;
    uint64_t bytes = 0;
    int64_t t_start = 0;
    std::unique_ptr<IoError> error;
  };
  struct Fault {
    uint64_t at;  // index among operations of kind op
    int err;
    bool short_io;
    FaultOp op;
  };
  friend struct SubReq;

  void open_paths(const StoreOptions& opt);
  void start(SubReq* s);
  void begin_rmw(SubReq* s);
  void dispatch(SubReq* s);
  void io_done(Io* io, int64_t res) noexcept override;
  void phase_done(SubReq* s);
  void finish(SubReq* s, int err) noexcept;
  void apply_faults(Io* io);
  void ensure_open() const;
  std::shared_ptr<Object> object_locked(uint64_t obj) const;
  void teardown_paths() noexcept;

  std::vector<PathState> paths_;
  std::vector<std::string> run_dirs_;
  uint64_t stripe_;
  unsigned qd_;
  unsigned reclaimed_ = 0;
  std::shared_ptr<TraceRing> trace_;
  std::unique_ptr<Backend> backend_;

  std::mutex admin_mu_;  // serialises create/remove/close: file and directory lifetimes
  std::mutex mu_;
  std::condition_variable cv_;  // slots freed, tickets done, objects idle
  unsigned free_slots_;
  uint64_t next_obj_ = 1, next_ticket_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Object>> objects_;
  std::map<uint64_t, Ticket> tickets_;
  bool closed_ = false;

  std::mutex fault_mu_;
  std::vector<Fault> faults_;
  uint64_t ops_seen_[3] = {0, 0, 0};  // indexed by FaultOp
};

}  // namespace offload
