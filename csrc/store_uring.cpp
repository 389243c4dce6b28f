// io_uring backend: one ring of queue_depth entries; callers (and the completion thread, for retries and RMW
// phases) submit under sq_mu_, one completion thread reaps. Compiled only with OFFLOAD_HAVE_URING.
// Note [uring depth]: the store keeps at most queue_depth Io in flight and each Io has at most one operation
// in the ring, so the SQ (queue_depth entries, flushed after every push) and the CQ (twice that, each CQE
// marked seen before its Io is resubmitted) can never overflow; io_uring_enter's EAGAIN/EBUSY are therefore
// transient kernel allocation failures, retried after a pause. EINTR (a signal during the syscall) is retried
// at once. A failed submit consumed no SQE, so retrying submits the same entries: nothing is lost or doubled.
#ifdef OFFLOAD_HAVE_URING
#include <liburing.h>
#include <sys/uio.h>
#include <time.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "store_backend.h"

namespace offload {

namespace {

constexpr unsigned kMaxRegistered = 4096;      // sparse fixed-buffer table size
constexpr size_t kMaxRegion = size_t(1) << 30;  // the kernel caps one registered iovec at 1 GiB

void pause_us(long us) {
  timespec ts{0, us * 1000};
  nanosleep(&ts, nullptr);
}

class UringBackend final : public Backend {
 public:
  UringBackend(IoSink* sink) : sink_(sink) {}
  int init(unsigned depth) {
    int rc = io_uring_queue_init(depth, &ring_, 0);
    if (rc < 0) return rc;
    ring_ok_ = true;
    try {
      reaper_ = std::thread([this] { reap(); });
    } catch (...) {
      return -EAGAIN;
    }
    return 0;
  }
  ~UringBackend() override {
    stop();
    if (ring_ok_) io_uring_queue_exit(&ring_);
  }
  const char* name() const override { return "io_uring"; }

  void submit(Io* io) noexcept override {
    std::lock_guard<std::mutex> lk(sq_mu_);
    io_uring_sqe* sqe;
    while (!(sqe = io_uring_get_sqe(&ring_))) flush_locked();
    if (io->fault_err) {
      // The injected error replaces this NOP's result in reap(), where a real CQE result is produced.
      io_uring_prep_nop(sqe);
    } else {
      const int idx = fixed_index(io->buf, io->xfer);
      const unsigned n = unsigned(io->xfer);
      if (io->write) {
        if (idx >= 0) io_uring_prep_write_fixed(sqe, io->fd, io->buf, n, io->off, idx);
        else io_uring_prep_write(sqe, io->fd, io->buf, n, io->off);
      } else {
        if (idx >= 0) io_uring_prep_read_fixed(sqe, io->fd, io->buf, n, io->off, idx);
        else io_uring_prep_read(sqe, io->fd, io->buf, n, io->off);
      }
    }
    io_uring_sqe_set_data(sqe, io);
    flush_locked();
  }

  bool register_buffer(void* p, size_t n) override {
    if (!p || n == 0) return false;
    std::lock_guard<std::mutex> lk(reg_mu_);
    if (!sparse_) {
      if (io_uring_register_buffers_sparse(&ring_, kMaxRegistered) != 0) return false;
      sparse_ = true;
    }
    std::vector<iovec> iov;
    for (size_t o = 0; o < n; o += kMaxRegion)
      iov.push_back(iovec{static_cast<uint8_t*>(p) + o, std::min(kMaxRegion, n - o)});
    if (used_ + iov.size() > kMaxRegistered) return false;
    std::vector<__u64> tags(iov.size(), 0);
    int rc = io_uring_register_buffers_update_tag(&ring_, used_, iov.data(), tags.data(), unsigned(iov.size()));
    const unsigned first = used_;
    used_ += unsigned(iov.size());  // a failed update may have filled some slots: never reuse them
    if (rc != int(iov.size())) return false;
    for (size_t i = 0; i < iov.size(); ++i)
      regions_.push_back(Region{reinterpret_cast<uintptr_t>(iov[i].iov_base), iov[i].iov_len, first + unsigned(i)});
    return true;
  }

  bool inject_enter_fault(int err, unsigned submits, unsigned waits) override {
    enter_err_.store(err);
    submit_faults_.fetch_add(submits);
    wait_faults_.fetch_add(waits);
    return true;
  }
  unsigned enter_faults_armed() const override { return submit_faults_.load() + wait_faults_.load(); }

  void stop() noexcept override {
    if (!reaper_.joinable()) return;
    {
      // A NOP with no Io is the reaper's signal to exit; every real Io has completed before stop() is called.
      std::lock_guard<std::mutex> lk(sq_mu_);
      io_uring_sqe* sqe;
      while (!(sqe = io_uring_get_sqe(&ring_))) flush_locked();
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, nullptr);
      flush_locked();
    }
    reaper_.join();
  }

 private:
  struct Region {
    uintptr_t base;
    size_t len;
    unsigned index;
  };

  // Consumes one armed enter fault of the counter: Backend::inject_enter_fault.
  bool take_fault(std::atomic<unsigned>& armed) noexcept {
    unsigned n = armed.load();
    while (n > 0 && !armed.compare_exchange_weak(n, n - 1)) {
    }
    return n > 0;
  }

  void flush_locked() noexcept {
    while (io_uring_sq_ready(&ring_) > 0) {
      int rc = take_fault(submit_faults_) ? -enter_err_.load() : io_uring_submit(&ring_);
      if (rc >= 0 || rc == -EINTR) continue;
      pause_us(rc == -EAGAIN || rc == -EBUSY ? 50 : 1000);
    }
  }

  int fixed_index(const uint8_t* buf, uint64_t n) {
    std::lock_guard<std::mutex> lk(reg_mu_);
    const uintptr_t b = reinterpret_cast<uintptr_t>(buf);
    for (const Region& r : regions_)
      if (b >= r.base && b - r.base <= r.len && n <= r.len - (b - r.base)) return int(r.index);
    return -1;
  }

  void reap() noexcept {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      int rc = take_fault(wait_faults_) ? -enter_err_.load() : io_uring_wait_cqe(&ring_, &cqe);
      if (rc == -EINTR || rc == -EAGAIN) continue;
      if (rc < 0) {
        pause_us(1000);
        continue;
      }
      Io* io = static_cast<Io*>(io_uring_cqe_get_data(cqe));
      int64_t res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);  // before io_done may resubmit: Note [uring depth]
      if (!io) return;
      if (io->fault_err) res = -io->fault_err;
      sink_->io_done(io, res);
    }
  }

  IoSink* sink_;
  io_uring ring_{};
  bool ring_ok_ = false;
  std::mutex sq_mu_;
  std::thread reaper_;
  std::mutex reg_mu_;
  bool sparse_ = false;
  unsigned used_ = 0;
  std::vector<Region> regions_;
  std::atomic<int> enter_err_{0};
  std::atomic<unsigned> submit_faults_{0}, wait_faults_{0};
};

}  // namespace

std::unique_ptr<Backend> make_uring_backend(IoSink* sink, unsigned queue_depth, int* err) {
  auto b = std::make_unique<UringBackend>(sink);
  int rc = b->init(queue_depth);
  if (rc < 0) {
    *err = -rc;
    return nullptr;
  }
  return b;
}

}  // namespace offload
#endif  // OFFLOAD_HAVE_URING
