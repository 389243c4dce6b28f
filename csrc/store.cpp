// Store objects, striping, tickets and the sub-request state machine (Note [store requests] in store.h).
#include "store.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "trace.h"

namespace offload {

namespace {
constexpr uint64_t kMaxSub = 1u << 20;  // sub-requests are cut at 1 MiB of file offset
constexpr unsigned kMaxStalls = 64;     // completions in a row that moved no whole unit before we call it EIO
constexpr unsigned kMaxQueueDepth = 4096;
}  // namespace

struct SubReq : Io {
  enum Phase : uint8_t { kPlain, kBounce, kRmwRead };
  uint64_t ticket = 0;
  std::shared_ptr<Store::Object> obj;
  unsigned path = 0;
  uint32_t unit = 1;  // a short transfer advances by whole units: the path's alignment under O_DIRECT
  bool user_write = false;
  uint8_t* user = nullptr;
  uint64_t file_off = 0, user_len = 0;  // the caller's bytes, in this backing file
  uint8_t* bounce = nullptr;            // Note [store alignment]: covers [span_off, span_off + span_len)
  uint64_t span_off = 0, span_len = 0;
  Phase phase = kPlain;
  bool holds_rmw = false;
  unsigned stalls = 0;
  ~SubReq() { std::free(bounce); }
  void set_io(bool w, uint8_t* b, uint64_t o, uint64_t n) {
    write = w;
    buf = b;
    off = o;
    len = n;
    stalls = 0;
  }
};

Store::Object::~Object() {
  for (File& f : files)
    if (f.fd >= 0) ::close(f.fd);
}

std::vector<std::string> store_backends() {
#ifdef OFFLOAD_HAVE_URING
  return {"io_uring", "threadpool"};
#else
  return {"threadpool"};
#endif
}

Store::Store(const StoreOptions& opt) : stripe_(opt.stripe_bytes), qd_(opt.queue_depth), trace_(opt.trace) {
  std::string bad;
  if (opt.paths.empty()) bad += " paths: give at least one directory;";
  if (qd_ < 1 || qd_ > kMaxQueueDepth) bad += " queue_depth: must be in 1.." + std::to_string(kMaxQueueDepth) + ";";
  if (stripe_ == 0) bad += " stripe_bytes: must be positive;";
  if (opt.threads < 1 || opt.threads > 256) bad += " threads: must be in 1..256;";
  if (opt.backend != "auto" && opt.backend != "io_uring" && opt.backend != "threadpool")
    bad += " backend: must be 'auto', 'io_uring' or 'threadpool';";
  if (opt.direct != "auto" && opt.direct != "on" && opt.direct != "off") bad += " direct: must be 'auto', 'on' or 'off';";
  if (!bad.empty()) throw std::invalid_argument("Store:" + bad.substr(0, bad.size() - 1));
  free_slots_ = qd_;
  try {
    open_paths(opt);
    int err = 0;
    if (opt.backend != "threadpool") backend_ = make_uring_backend(this, qd_, &err);
    if (!backend_ && opt.backend == "io_uring")
      throw std::runtime_error(std::string("Store: io_uring backend unavailable: ") +
                               (err == ENOSYS ? "built without liburing" : std::strerror(err)));
    if (!backend_) backend_ = make_thread_backend(this, opt.threads);
  } catch (...) {
    teardown_paths();
    throw;
  }
}

Store::~Store() {
  try {
    close();
  } catch (...) {
  }
}

void Store::open_paths(const StoreOptions& opt) {
  // Every path is checked before anything is created, so a bad one leaves no run directory behind.
  for (const std::string& dir : opt.paths) {
    int rc = check_dir_writable(dir);
    if (rc != 0) throw IoError("open", dir, 0, 0, -rc);
  }
  for (const std::string& dir : opt.paths) {
    PathState ps;
    ps.dir = dir;
    reclaimed_ += reclaim_dead_runs(dir);
    int rc = make_run_dir(dir, &ps.run);
    if (rc != 0) throw IoError("open", dir, 0, 0, -rc);
    paths_.push_back(ps);
    run_dirs_.push_back(ps.run.path);
    PathState& p = paths_.back();
    if (opt.direct == "off") continue;
    DirectProbe probe;
    rc = probe_in(p.run.path, &probe);
    if (rc != 0) throw IoError("open", p.run.path, 0, 0, -rc);
    if (!probe.direct && opt.direct == "on") throw IoError("open", dir, 0, 0, EINVAL);
    p.direct = probe.direct;
    p.align = probe.direct ? probe.alignment : 1;
  }
}

void Store::teardown_paths() noexcept {
  for (PathState& p : paths_) remove_run_dir(&p.run);
}

std::vector<bool> Store::direct() const {
  std::vector<bool> v;
  for (const PathState& p : paths_) v.push_back(p.direct);
  return v;
}

std::vector<uint32_t> Store::alignment() const {
  std::vector<uint32_t> v;
  for (const PathState& p : paths_) v.push_back(p.align);
  return v;
}

void Store::ensure_open() const {
  if (closed_) throw std::invalid_argument("Store: I/O on a closed store");
}

std::shared_ptr<Store::Object> Store::object_locked(uint64_t obj) const {
  auto it = objects_.find(obj);
  if (it == objects_.end()) throw std::invalid_argument("Store: unknown object id " + std::to_string(obj));
  return it->second;
}

uint64_t Store::create(uint64_t nbytes) {
  std::lock_guard<std::mutex> admin(admin_mu_);
  uint64_t id;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ensure_open();
    id = next_obj_++;
  }
  auto o = std::make_shared<Object>();
  o->nbytes = nbytes;
  const uint64_t P = paths_.size(), n = (nbytes + stripe_ - 1) / stripe_, last = n ? n - 1 : 0;
  for (uint64_t p = 0; p < std::min(P, n); ++p) {
    // Stripe i lives on path i % P at file offset (i / P) * stripe: path p holds stripes p, p + P, ...
    uint64_t bytes = ((last - p) / P + 1) * stripe_;
    if (last % P == p) bytes -= n * stripe_ - nbytes;
    File f;
    f.path = paths_[p].run.path + "/obj-" + std::to_string(id);
    const uint64_t fsize = align_up(bytes, paths_[p].align);
    int rc = create_backing_file(f.path, paths_[p].direct, fsize, &f.fd);
    if (rc != 0) {
      for (File& g : o->files) unlink(g.path.c_str());
      throw IoError("create", f.path, 0, fsize, -rc);
    }
    o->files.push_back(f);
  }
  std::lock_guard<std::mutex> lk(mu_);
  objects_[id] = o;
  return id;
}

void Store::remove(uint64_t obj) {
  std::lock_guard<std::mutex> admin(admin_mu_);
  std::shared_ptr<Object> o;
  {
    std::unique_lock<std::mutex> lk(mu_);
    ensure_open();
    o = object_locked(obj);
    objects_.erase(obj);
    cv_.wait(lk, [&] { return o->inflight == 0; });
  }
  for (File& f : o->files) unlink(f.path.c_str());
}

uint64_t Store::size(uint64_t obj) {
  std::lock_guard<std::mutex> lk(mu_);
  ensure_open();
  return object_locked(obj)->nbytes;
}

std::vector<std::string> Store::path_of(uint64_t obj) {
  std::lock_guard<std::mutex> lk(mu_);
  ensure_open();
  std::vector<std::string> v;
  for (const File& f : object_locked(obj)->files) v.push_back(f.path);
  return v;
}

uint64_t Store::submit(bool write, uint64_t obj, uint64_t offset, void* buf, uint64_t len, uint32_t tag) {
  std::vector<std::unique_ptr<SubReq>> subs;
  uint64_t t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ensure_open();
    std::shared_ptr<Object> o = object_locked(obj);
    if (offset > o->nbytes || len > o->nbytes - offset)
      throw std::invalid_argument("Store: request [" + std::to_string(offset) + ", " + std::to_string(offset + len) +
                                  ") lies outside object " + std::to_string(obj) + " of " +
                                  std::to_string(o->nbytes) + " bytes");
    t = next_ticket_++;
    const uint64_t P = paths_.size();
    uint64_t pos = offset, end = offset + len;
    while (pos < end) {
      const uint64_t stripe = pos / stripe_, within = pos % stripe_;
      auto s = std::make_unique<SubReq>();
      s->ticket = t;
      s->obj = o;
      s->path = unsigned(stripe % P);
      s->file_off = (stripe / P) * stripe_ + within;
      s->user_len = std::min({end - pos, stripe_ - within, kMaxSub - s->file_off % kMaxSub});
      s->user = static_cast<uint8_t*>(buf) + (pos - offset);
      s->user_write = write;
      s->fd = o->files[s->path].fd;
      s->unit = paths_[s->path].direct ? paths_[s->path].align : 1;
      pos += s->user_len;
      subs.push_back(std::move(s));
    }
    Ticket& tk = tickets_[t];
    tk.pending = unsigned(subs.size());
    tk.write = write;
    tk.tag = tag;
    tk.bytes = len;
    tk.t_start = now_ns();
    o->inflight += unsigned(subs.size());
    if (subs.empty() && trace_)
      trace_->record(TraceEvent{write ? kTraceDiskWrite : kTraceDiskRead, tag, 0, tk.t_start, tk.t_start});
  }
  // From here nothing throws: each sub-request's failure is delivered to its ticket.
  for (auto& s : subs) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return free_slots_ > 0; });
      --free_slots_;
    }
    start(s.release());
  }
  return t;
}

void Store::start(SubReq* s) {
  const uint32_t a = s->unit;
  const bool aligned = s->file_off % a == 0 && s->user_len % a == 0 && reinterpret_cast<uintptr_t>(s->user) % a == 0;
  if (aligned) {
    s->phase = SubReq::kPlain;
    s->set_io(s->user_write, s->user, s->file_off, s->user_len);
    dispatch(s);
    return;
  }
  s->span_off = align_down(s->file_off, a);
  s->span_len = align_up(s->file_off + s->user_len, a) - s->span_off;
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(a, sizeof(void*)), s->span_len) != 0) {
    s->set_io(s->user_write, s->user, s->file_off, s->user_len);
    finish(s, ENOMEM);
    return;
  }
  s->bounce = static_cast<uint8_t*>(p);
  const bool partial = s->span_off != s->file_off || s->span_len != s->user_len;
  if (!s->user_write || !partial) {
    if (s->user_write) std::memcpy(s->bounce, s->user, s->user_len);
    s->phase = SubReq::kBounce;
    s->set_io(s->user_write, s->bounce, s->span_off, s->span_len);
    dispatch(s);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (s->obj->rmw_busy) {
      s->obj->rmw_waiting.push_back(s);  // started by the RMW ahead of it, in finish()
      return;
    }
    s->obj->rmw_busy = true;
    s->holds_rmw = true;
  }
  begin_rmw(s);
}

void Store::begin_rmw(SubReq* s) {
  s->phase = SubReq::kRmwRead;
  s->set_io(false, s->bounce, s->span_off, s->span_len);
  dispatch(s);
}

void Store::dispatch(SubReq* s) {
  s->xfer = s->len;
  s->fault_err = 0;
  apply_faults(s);
  backend_->submit(s);
}

void Store::io_done(Io* io, int64_t res) noexcept {
  SubReq* s = static_cast<SubReq*>(io);
  if (res == -EAGAIN || res == -EINTR) {
    dispatch(s);
    return;
  }
  if (res < 0) {
    finish(s, int(-res));
    return;
  }
  // Files are pre-sized, so a transfer of 0 bytes is not EOF but a device that makes no progress.
  if (res == 0) {
    finish(s, EIO);
    return;
  }
  // Under O_DIRECT the remainder must stay aligned: a short transfer that ends mid-unit is redone from the
  // unit's start (rewriting or rereading bytes that are already right).
  const uint64_t adv = align_down(std::min<uint64_t>(uint64_t(res), s->len), s->unit);
  if (adv == 0) {
    if (++s->stalls > kMaxStalls)
      finish(s, EIO);
    else
      dispatch(s);
    return;
  }
  s->stalls = 0;
  s->buf += adv;
  s->off += adv;
  s->len -= adv;
  if (s->len > 0)
    dispatch(s);
  else
    phase_done(s);
}

void Store::phase_done(SubReq* s) {
  switch (s->phase) {
    case SubReq::kPlain:
      finish(s, 0);
      return;
    case SubReq::kBounce:
      if (!s->user_write) std::memcpy(s->user, s->bounce + (s->file_off - s->span_off), s->user_len);
      finish(s, 0);
      return;
    case SubReq::kRmwRead:
      std::memcpy(s->bounce + (s->file_off - s->span_off), s->user, s->user_len);
      s->phase = SubReq::kBounce;
      s->set_io(true, s->bounce, s->span_off, s->span_len);
      dispatch(s);
      return;
  }
}

void Store::finish(SubReq* s, int err) noexcept {
  SubReq* next = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    Object& o = *s->obj;
    if (s->holds_rmw) {
      if (o.rmw_waiting.empty()) {
        o.rmw_busy = false;
      } else {
        next = o.rmw_waiting.front();  // inherits the object's RMW turn
        o.rmw_waiting.pop_front();
        next->holds_rmw = true;
      }
    }
    auto it = tickets_.find(s->ticket);
    if (it != tickets_.end()) {
      Ticket& tk = it->second;
      if (err != 0 && !tk.error) {
        try {
          tk.error = std::make_unique<IoError>(s->write ? "write" : "read", o.files[s->path].path, s->off, s->len, err);
        } catch (...) {
        }
      }
      if (--tk.pending == 0 && trace_)
        trace_->record(TraceEvent{tk.write ? kTraceDiskWrite : kTraceDiskRead, tk.tag, tk.bytes, tk.t_start, now_ns()});
    }
    --o.inflight;
    ++free_slots_;
  }
  cv_.notify_all();
  delete s;
  if (next) begin_rmw(next);
}

void Store::wait(uint64_t ticket) {
  std::unique_ptr<IoError> err;
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (tickets_.find(ticket) == tickets_.end())
      throw std::invalid_argument("Store: unknown ticket " + std::to_string(ticket) + " (already waited?)");
    cv_.wait(lk, [&] {
      auto it = tickets_.find(ticket);
      return it == tickets_.end() || it->second.pending == 0;
    });
    auto it = tickets_.find(ticket);
    if (it == tickets_.end())
      throw std::invalid_argument("Store: ticket " + std::to_string(ticket) + " was retired by another waiter");
    err = std::move(it->second.error);
    tickets_.erase(it);
  }
  if (err) throw IoError(*err);
}

bool Store::poll(uint64_t ticket) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end()) throw std::invalid_argument("Store: unknown ticket " + std::to_string(ticket));
  return it->second.pending == 0;
}

void Store::wait_all(std::vector<uint64_t>* retired) {
  std::unique_ptr<IoError> err;
  {
    std::unique_lock<std::mutex> lk(mu_);
    std::vector<uint64_t> ids;
    for (auto& kv : tickets_) ids.push_back(kv.first);
    cv_.wait(lk, [&] {
      for (uint64_t id : ids) {
        auto it = tickets_.find(id);
        if (it != tickets_.end() && it->second.pending != 0) return false;
      }
      return true;
    });
    for (uint64_t id : ids) {
      auto it = tickets_.find(id);
      if (it == tickets_.end()) continue;
      if (!err && it->second.error) err = std::move(it->second.error);
      tickets_.erase(it);
      if (retired) retired->push_back(id);
    }
  }
  if (err) throw IoError(*err);
}

void Store::close() {
  std::lock_guard<std::mutex> admin(admin_mu_);
  std::unordered_map<uint64_t, std::shared_ptr<Object>> objs;
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (closed_) return;
    closed_ = true;  // refuses new requests; those already accepted finish below
    cv_.wait(lk, [&] { return free_slots_ == qd_ && std::all_of(tickets_.begin(), tickets_.end(), [](auto& kv) {
                                return kv.second.pending == 0;
                              }); });
    tickets_.clear();
    objs.swap(objects_);
  }
  if (backend_) backend_->stop();
  for (auto& kv : objs)
    for (File& f : kv.second->files) unlink(f.path.c_str());
  objs.clear();
  teardown_paths();
}

bool Store::register_buffer(void* p, size_t n) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    ensure_open();
  }
  return backend_->register_buffer(p, n);
}

void Store::inject_fault(uint64_t k, int err, bool short_io, FaultOp op) {
  if (err < 0 || (err == 0 && !short_io))
    throw std::invalid_argument("inject_fault: give a positive errno as err, or short=True");
  std::lock_guard<std::mutex> lk(fault_mu_);
  faults_.push_back(Fault{ops_seen_[int(op)] + k, err, short_io, op});
}

void Store::inject_enter_fault(int err, unsigned submits, unsigned waits) {
  // Other errors of io_uring_enter are not transient: the backend would retry them forever, so a test must
  // not arm them.
  if (err != EINTR && err != EAGAIN && err != EBUSY)
    throw std::invalid_argument("inject_enter_fault: err must be EINTR, EAGAIN or EBUSY");
  if (!backend_->inject_enter_fault(err, submits, waits))
    throw std::invalid_argument(std::string("inject_enter_fault: the ") + backend_->name() +
                                " backend does not call io_uring_enter");
}

void Store::clear_faults() {
  std::lock_guard<std::mutex> lk(fault_mu_);
  faults_.clear();
}

size_t Store::faults_armed() {
  std::lock_guard<std::mutex> lk(fault_mu_);
  return faults_.size();
}

// Counts every backend operation (retries and RMW phases included) by kind, and arms the matching fault.
void Store::apply_faults(Io* io) {
  std::lock_guard<std::mutex> lk(fault_mu_);
  const uint64_t any = ops_seen_[int(FaultOp::kAny)]++;
  const FaultOp kind = io->write ? FaultOp::kWrite : FaultOp::kRead;
  const uint64_t nth = ops_seen_[int(kind)]++;
  if (faults_.empty()) return;
  for (auto it = faults_.begin(); it != faults_.end(); ++it) {
    if (!(it->op == FaultOp::kAny ? it->at == any : it->op == kind && it->at == nth)) continue;
    if (it->err) {
      io->fault_err = it->err;
    } else {
      // Really transfer part: half, rounded down to whole units, so the retry path moves real bytes.
      const uint64_t unit = static_cast<SubReq*>(io)->unit;
      const uint64_t part = align_down(io->len / 2, unit);
      if (part > 0) io->xfer = part;
    }
    faults_.erase(it);
    return;
  }
}

}  // namespace offload
