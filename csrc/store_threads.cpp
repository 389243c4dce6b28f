// Thread-pool backend: `threads` workers, each taking one Io at a time and running one pread/pwrite on it.
// Used where io_uring is not built in or cannot be set up; retries and splitting live in Store::io_done, so
// the semantics match the io_uring backend exactly.
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "store_backend.h"

namespace offload {

namespace {

class ThreadBackend final : public Backend {
 public:
  ThreadBackend(IoSink* sink, unsigned threads) : sink_(sink) {
    try {
      for (unsigned i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
    } catch (...) {
      stop();
      throw;
    }
  }
  ~ThreadBackend() override { stop(); }
  const char* name() const override { return "threadpool"; }

  void submit(Io* io) noexcept override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(io);  // the store bounds the queue to its depth, so this never grows past it
    }
    cv_.notify_one();
  }

  void stop() noexcept override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_)
      if (t.joinable()) t.join();
    workers_.clear();
  }

 private:
  void run() {
    for (;;) {
      Io* io;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        io = queue_.front();
        queue_.pop_front();
      }
      int64_t res;
      if (io->fault_err) {
        res = -io->fault_err;
      } else {
        ssize_t n = io->write ? pwrite(io->fd, io->buf, io->xfer, off_t(io->off))
                              : pread(io->fd, io->buf, io->xfer, off_t(io->off));
        res = n < 0 ? -int64_t(errno) : int64_t(n);
      }
      sink_->io_done(io, res);
    }
  }

  IoSink* sink_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Io*> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Backend> make_thread_backend(IoSink* sink, unsigned threads) {
  return std::make_unique<ThreadBackend>(sink, threads);
}

#ifndef OFFLOAD_HAVE_URING
std::unique_ptr<Backend> make_uring_backend(IoSink*, unsigned, int* err) {
  *err = ENOSYS;
  return nullptr;
}
#endif

}  // namespace offload
