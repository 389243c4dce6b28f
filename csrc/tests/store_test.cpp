// Store behaviours, one function each, every one run against each compiled backend (io_uring, threadpool).
// Scratch directories live under $OFFLOAD_TEST_DIR or /tmp (ext4 here: O_DIRECT works); a case that needs
// O_DIRECT on a path that refuses it reports SKIP rather than passing.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <thread>

#include "check.h"
#include "store.h"
#include "trace.h"

using namespace offload;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    const char* base = std::getenv("OFFLOAD_TEST_DIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/offload-store-test-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data())) path = buf.data();
  }
  ~TempDir() {
    if (!path.empty()) std::system(("rm -rf '" + path + "'").c_str());
  }
  std::string sub(const std::string& name) const {
    std::string p = path + "/" + name;
    mkdir(p.c_str(), 0700);
    return p;
  }
};

struct Aligned {
  uint8_t* p = nullptr;
  size_t n;
  explicit Aligned(size_t n_) : n(n_) {
    void* v = nullptr;
    if (posix_memalign(&v, 4096, n ? n : 1) == 0) p = static_cast<uint8_t*>(v);
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
};

void fill(uint8_t* p, size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  for (size_t i = 0; i < n; ++i) p[i] = uint8_t(g());
}

StoreOptions opts(const std::string& backend, std::vector<std::string> paths, uint64_t stripe = 4u << 20) {
  StoreOptions o;
  o.paths = std::move(paths);
  o.backend = backend;
  o.stripe_bytes = stripe;
  o.queue_depth = 8;
  o.threads = 2;
  return o;
}

// Runs fn once per backend; a failure names the backend.
check::Result each_backend(const std::function<check::Result(const std::string&)>& fn) {
  check::Result worst = check::SKIP;
  for (const std::string& b : store_backends()) {
    check::Result r;
    try {
      r = fn(b);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  [%s] unexpected exception: %s\n", b.c_str(), e.what());
      r = check::FAIL;
    }
    if (r == check::FAIL) {
      std::fprintf(stderr, "  [%s] failed\n", b.c_str());
      return r;
    }
    if (r == check::SKIP) std::fprintf(stderr, "  [%s] skipped\n", b.c_str());
    if (r == check::PASS) worst = check::PASS;
  }
  if (store_backends().size() < 2) std::fprintf(stderr, "  io_uring not built in: threadpool only\n");
  return worst;
}

bool wait_ok(Store& s, uint64_t t) {
  try {
    s.wait(t);
    return true;
  } catch (const IoError& e) {
    std::fprintf(stderr, "  %s\n", e.what());
    return false;
  }
}

bool round_trip(Store& s, uint64_t obj, uint64_t off, size_t n, uint32_t seed) {
  Aligned w(n), r(n);
  fill(w.p, n, seed);
  std::memset(r.p, 0, n);
  if (!wait_ok(s, s.submit(true, obj, off, w.p, n, 1))) return false;
  if (!wait_ok(s, s.submit(false, obj, off, r.p, n, 1))) return false;
  return std::memcmp(w.p, r.p, n) == 0;
}

bool exists(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0;
}

}  // namespace

TEST(store_round_trip_aligned) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.path}, 1u << 20));
    EXPECT(std::string(s.backend_name()) == be);
    if (!s.direct()[0]) return check::SKIP;  // the aligned fast path needs O_DIRECT
    uint64_t obj = s.create(6u << 20);
    EXPECT(s.size(obj) == (6u << 20));
    EXPECT(round_trip(s, obj, 0, 6u << 20, 1));
    EXPECT(round_trip(s, obj, 1u << 20, 3u << 20, 2));
    return check::PASS;
  });
}

TEST(store_short_write_retried_exact) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.path}));
    uint64_t obj = s.create(1u << 20);
    s.inject_fault(0, 0, true, FaultOp::kWrite);
    s.inject_fault(1, 0, true, FaultOp::kWrite);  // the retry of the remainder is short again
    EXPECT(round_trip(s, obj, 0, 256 << 10, 3));
    EXPECT(s.faults_armed() == 0);
    return check::PASS;
  });
}

TEST(store_short_read_retried_exact) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.path}));
    uint64_t obj = s.create(1u << 20);
    Aligned w(512 << 10), r(512 << 10);
    fill(w.p, w.n, 4);
    EXPECT(wait_ok(s, s.submit(true, obj, 0, w.p, w.n, 0)));
    s.inject_fault(0, 0, true, FaultOp::kRead);
    s.inject_fault(1, 0, true, FaultOp::kRead);
    EXPECT(wait_ok(s, s.submit(false, obj, 0, r.p, r.n, 0)));
    EXPECT(std::memcmp(w.p, r.p, w.n) == 0);
    // Unaligned, through the bounce buffer: the short read lands mid-span.
    std::vector<uint8_t> u(70001);
    s.inject_fault(0, 0, true, FaultOp::kRead);
    EXPECT(wait_ok(s, s.submit(false, obj, 333, u.data(), u.size(), 0)));
    EXPECT(std::memcmp(u.data(), w.p + 333, u.size()) == 0);
    EXPECT(s.faults_armed() == 0);
    return check::PASS;
  });
}

TEST(store_eagain_retried) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.path}));
    uint64_t obj = s.create(1u << 20);
    s.inject_fault(0, EAGAIN, false, FaultOp::kWrite);
    s.inject_fault(1, EAGAIN, false, FaultOp::kWrite);
    s.inject_fault(0, EINTR, false, FaultOp::kRead);
    EXPECT(round_trip(s, obj, 4096, 128 << 10, 5));
    EXPECT(s.faults_armed() == 0);
    return check::PASS;
  });
}

// io_uring_enter itself interrupted (EINTR) or refused for now (EAGAIN, EBUSY), on submission and while
// waiting for completions: every request still completes with its exact bytes, and every armed fault fired.
TEST(store_uring_enter_eintr_eagain_retried) {
  bool have_uring = false;
  for (const std::string& b : store_backends()) have_uring |= b == "io_uring";
  if (!have_uring) return check::SKIP;
  TempDir d;
  Store s(opts("io_uring", {d.path}, 64 << 10));
  uint64_t obj = s.create(1u << 20);
  for (int err : {EINTR, EAGAIN, EBUSY}) {
    s.inject_enter_fault(err, 3, 3);
    EXPECT(round_trip(s, obj, 1000, 300000, 17 + err));  // several sub-requests each way
    EXPECT(s.enter_faults_armed() == 0);
  }
  // Many requests in flight at once while both sides keep failing.
  s.inject_enter_fault(EINTR, 50, 50);
  std::vector<std::unique_ptr<Aligned>> w, r;
  std::vector<uint64_t> t;
  for (unsigned i = 0; i < 16; ++i) {
    w.push_back(std::make_unique<Aligned>(64 << 10));
    fill(w.back()->p, 64 << 10, 100 + i);
    t.push_back(s.submit(true, obj, i * (64 << 10), w.back()->p, 64 << 10, 0));
  }
  for (uint64_t x : t) EXPECT(wait_ok(s, x));
  t.clear();
  for (unsigned i = 0; i < 16; ++i) {
    r.push_back(std::make_unique<Aligned>(64 << 10));
    t.push_back(s.submit(false, obj, i * (64 << 10), r.back()->p, 64 << 10, 0));
  }
  for (uint64_t x : t) EXPECT(wait_ok(s, x));
  for (unsigned i = 0; i < 16; ++i) EXPECT(std::memcmp(w[i]->p, r[i]->p, 64 << 10) == 0);
  EXPECT(s.enter_faults_armed() == 0);
  bool refused = false;
  try {
    s.inject_enter_fault(EIO, 1, 0);  // not transient: would be retried forever
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  EXPECT(refused);
  Store tp(opts("threadpool", {d.path}));
  refused = false;
  try {
    tp.inject_enter_fault(EINTR, 1, 0);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  EXPECT(refused);
  return check::PASS;
}

TEST(store_eio_reports_path_offset_errno) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.sub("a"), d.sub("b")}, 64 << 10));
    uint64_t obj = s.create(1u << 20), other = s.create(256 << 10);
    Aligned keep(256 << 10);
    fill(keep.p, keep.n, 6);
    EXPECT(wait_ok(s, s.submit(true, other, 0, keep.p, keep.n, 0)));
    Aligned w(64 << 10);
    fill(w.p, w.n, 7);
    s.inject_fault(0, EIO, false, FaultOp::kWrite);
    // Object offset 3 * 64 KiB is stripe 3: path 1 at file offset 64 KiB.
    uint64_t t = s.submit(true, obj, 3 * (64 << 10), w.p, w.n, 0);
    bool raised = false;
    try {
      s.wait(t);
    } catch (const IoError& e) {
      raised = true;
      EXPECT(e.err == EIO);
      EXPECT(e.op == "write");
      EXPECT(e.path == s.path_of(obj)[1]);
      EXPECT(e.offset == (64 << 10));
      EXPECT(e.length == (64 << 10));
    }
    EXPECT(raised);
    Aligned r(keep.n);
    EXPECT(wait_ok(s, s.submit(false, other, 0, r.p, r.n, 0)));
    EXPECT(std::memcmp(r.p, keep.p, keep.n) == 0);
    EXPECT(round_trip(s, obj, 3 * (64 << 10), 64 << 10, 8));  // the store is still usable
    return check::PASS;
  });
}

TEST(store_unaligned_tail_round_trip) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.sub("a"), d.sub("b"), d.sub("c")}, 20000));  // stripes not a multiple of the block
    const uint64_t n = 300007;
    uint64_t obj = s.create(n);
    std::vector<uint8_t> model(n, 0), zero(n, 0);
    EXPECT(wait_ok(s, s.submit(true, obj, 0, zero.data(), n, 0)));
    std::mt19937_64 g(9);
    for (int round = 0; round < 40; ++round) {
      // Several disjoint unaligned writes in flight at once, some sharing blocks: Note [store alignment].
      std::vector<std::vector<uint8_t>> bufs;
      std::vector<uint64_t> tickets;
      uint64_t pos = g() % 5000;
      for (int k = 0; k < 4 && pos < n; ++k) {
        uint64_t len = std::min<uint64_t>(1 + g() % 40000, n - pos);
        std::vector<uint8_t> b(len + 1);
        fill(b.data(), b.size(), uint32_t(g()));
        std::memcpy(model.data() + pos, b.data() + 1, len);
        tickets.push_back(s.submit(true, obj, pos, b.data() + 1, len, 0));  // +1: an unaligned address
        bufs.push_back(std::move(b));
        pos += len + g() % 700;
      }
      for (uint64_t t : tickets) EXPECT(wait_ok(s, t));
      uint64_t off = g() % n, len = 1 + g() % (n - off);
      std::vector<uint8_t> r(len + 3);
      EXPECT(wait_ok(s, s.submit(false, obj, off, r.data() + 3, len, 0)));
      EXPECT(std::memcmp(r.data() + 3, model.data() + off, len) == 0);
    }
    std::vector<uint8_t> all(n);
    EXPECT(wait_ok(s, s.submit(false, obj, 0, all.data(), n, 0)));
    EXPECT(all == model);
    return check::PASS;
  });
}

TEST(store_buffered_round_trip) {
  return each_backend([](const std::string& be) {
    TempDir d;
    StoreOptions o = opts(be, {d.path});
    o.direct = "off";
    Store s(o);
    EXPECT(!s.direct()[0] && s.alignment()[0] == 1);
    uint64_t obj = s.create(100001);
    std::vector<uint8_t> w(99990), r(99990);
    fill(w.data(), w.size(), 10);
    s.inject_fault(0, 0, true, FaultOp::kAny);
    EXPECT(wait_ok(s, s.submit(true, obj, 11, w.data(), w.size(), 0)));
    EXPECT(wait_ok(s, s.submit(false, obj, 11, r.data(), r.size(), 0)));
    EXPECT(w == r);
    EXPECT(s.faults_armed() == 0);
    return check::PASS;
  });
}

TEST(store_direct_on_refused_names_path) {
  return each_backend([](const std::string& be) {
    // Needs a filesystem that refuses O_DIRECT; tmpfs does before Linux 6.6 (it accepts it since).
    const std::string shm = "/dev/shm";
    if (check_dir_writable(shm) != 0 || probe_direct(shm).direct) return check::SKIP;
    StoreOptions o = opts(be, {shm});
    o.direct = "on";
    bool raised = false;
    try {
      Store s(o);
    } catch (const IoError& e) {
      raised = e.op == "open" && e.path == shm;
    }
    EXPECT(raised);
    o.direct = "auto";
    Store s(o);
    EXPECT(!s.direct()[0] && s.alignment()[0] == 1);
    uint64_t obj = s.create(10001);
    std::vector<uint8_t> w(9999), r(9999);
    fill(w.data(), w.size(), 18);
    EXPECT(wait_ok(s, s.submit(true, obj, 1, w.data(), w.size(), 0)));
    EXPECT(wait_ok(s, s.submit(false, obj, 1, r.data(), r.size(), 0)));
    EXPECT(w == r);
    return check::PASS;
  });
}

TEST(store_not_writable_path_fails_at_open) {
  return each_backend([](const std::string& be) {
    TempDir d;
    const std::string missing = d.path + "/missing", file = d.path + "/file";
    int fd = open(file.c_str(), O_CREAT | O_WRONLY, 0600);
    EXPECT(fd >= 0);
    close(fd);
    for (const auto& [path, err] : {std::pair<std::string, int>{missing, ENOENT}, {file, ENOTDIR}}) {
      bool raised = false;
      try {
        Store s(opts(be, {d.path, path}));
      } catch (const IoError& e) {
        raised = true;
        EXPECT(e.op == "open" && e.path == path && e.err == err);
      }
      EXPECT(raised);
    }
    EXPECT(!exists(d.path + "/missing"));
    // Nothing was created in the good path either: every path is checked first.
    int runs = 0;
    if (DIR* dir = opendir(d.path.c_str())) {
      while (dirent* e = readdir(dir)) runs += std::strncmp(e->d_name, "offload-run-", 12) == 0;
      closedir(dir);
    }
    EXPECT(runs == 0);
    if (geteuid() == 0) return check::PASS;  // root passes access(W_OK): the read-only case needs a user
    const std::string ro = d.sub("ro");
    chmod(ro.c_str(), 0500);
    bool raised = false;
    try {
      Store s(opts(be, {ro}));
    } catch (const IoError& e) {
      raised = e.path == ro && e.err == EACCES;
    }
    EXPECT(raised);
    return check::PASS;
  });
}

TEST(store_dead_run_reclaimed_live_run_kept) {
  return each_backend([&](const std::string& be) {
    TempDir d;
    Store live(opts(be, {d.path}));
    uint64_t obj = live.create(4096);
    // A child opens a store, writes, and dies without closing it: its run dir stays, its lock goes.
    pid_t pid = fork();
    if (pid == 0) {
      try {
        Store s(opts(be, {d.path}));
        uint64_t obj = s.create(8192);
        std::vector<uint8_t> b(8192, 1);
        s.wait(s.submit(true, obj, 0, b.data(), b.size(), 0));
        std::FILE* f = std::fopen((d.path + "/dead").c_str(), "w");
        if (f) {
          std::fputs(s.run_dirs()[0].c_str(), f);
          std::fclose(f);
        }
        _exit(0);  // inside the store's scope: no destructor, the store is never closed
      } catch (...) {
      }
      _exit(1);
    }
    EXPECT(pid > 0);
    int status = 0;
    EXPECT(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char dead[512] = {0};
    std::FILE* f = std::fopen((d.path + "/dead").c_str(), "r");
    EXPECT(f && std::fgets(dead, sizeof dead, f));
    std::fclose(f);
    // _exit above skipped Store::close, so the dead run's files are still there.
    EXPECT(exists(std::string(dead) + "/lock"));
    Store next(opts(be, {d.path}));
    EXPECT(next.reclaimed() == 1);
    EXPECT(!exists(dead));
    EXPECT(exists(live.run_dirs()[0] + "/lock"));
    EXPECT(exists(live.path_of(obj)[0]));
    EXPECT(round_trip(live, obj, 0, 4096, 11));
    return check::PASS;
  });
}

TEST(store_two_stores_one_dir) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store a(opts(be, {d.path})), b(opts(be, {d.path}));
    EXPECT(a.run_dirs()[0] != b.run_dirs()[0]);
    EXPECT(a.reclaimed() == 0 && b.reclaimed() == 0);
    uint64_t oa = a.create(65536), ob = b.create(65536);
    EXPECT(oa == ob);  // same ids, distinct files
    EXPECT(a.path_of(oa)[0] != b.path_of(ob)[0]);
    Aligned wa(65536), wb(65536), r(65536);
    fill(wa.p, wa.n, 12);
    fill(wb.p, wb.n, 13);
    EXPECT(wait_ok(a, a.submit(true, oa, 0, wa.p, wa.n, 0)));
    EXPECT(wait_ok(b, b.submit(true, ob, 0, wb.p, wb.n, 0)));
    EXPECT(wait_ok(a, a.submit(false, oa, 0, r.p, r.n, 0)));
    EXPECT(std::memcmp(r.p, wa.p, r.n) == 0);
    a.close();
    EXPECT(wait_ok(b, b.submit(false, ob, 0, r.p, r.n, 0)));
    EXPECT(std::memcmp(r.p, wb.p, r.n) == 0);
    return check::PASS;
  });
}

TEST(store_striping_layout) {
  return each_backend([](const std::string& be) {
    TempDir d;
    const uint64_t S = 8192, n = 7 * S + 100;  // stripes 0..7 over 3 paths; the last one is partial
    Store s(opts(be, {d.sub("a"), d.sub("b"), d.sub("c")}, S));
    uint64_t obj = s.create(n);
    std::vector<uint8_t> w(n);
    fill(w.data(), n, 14);
    EXPECT(wait_ok(s, s.submit(true, obj, 0, w.data(), n, 0)));
    auto files = s.path_of(obj);
    EXPECT(files.size() == 3);
    for (uint64_t i = 0; i * S < n; ++i) {
      const uint64_t len = std::min(S, n - i * S);
      std::vector<uint8_t> got(len);
      int fd = open(files[i % 3].c_str(), O_RDONLY);
      EXPECT(fd >= 0);
      EXPECT(pread(fd, got.data(), len, off_t((i / 3) * S)) == ssize_t(len));
      close(fd);
      EXPECT(std::memcmp(got.data(), w.data() + i * S, len) == 0);
    }
    struct stat st;
    EXPECT(stat(files[1].c_str(), &st) == 0 && uint64_t(st.st_size) == align_up(2 * S + 100, s.alignment()[1]));
    EXPECT((st.st_mode & 0777) == 0600);
    EXPECT(stat(s.run_dirs()[0].c_str(), &st) == 0 && (st.st_mode & 0777) == 0700);
    return check::PASS;
  });
}

TEST(store_queue_depth_backpressure) {
  return each_backend([](const std::string& be) {
    TempDir d;
    StoreOptions o = opts(be, {d.path}, 64 << 10);
    o.queue_depth = 1;
    Store s(o);
    const uint64_t n = 4u << 20;
    uint64_t obj = s.create(n);
    Aligned w(n), r(n);
    fill(w.p, n, 15);
    // Two threads, each a 2 MiB request of 32 sub-requests, through one slot.
    std::vector<uint64_t> t(2);
    std::thread th([&] { t[1] = s.submit(true, obj, n / 2, w.p + n / 2, n / 2, 0); });
    t[0] = s.submit(true, obj, 0, w.p, n / 2, 0);
    th.join();
    EXPECT(wait_ok(s, t[0]) && wait_ok(s, t[1]));
    EXPECT(wait_ok(s, s.submit(false, obj, 0, r.p, n, 0)));
    EXPECT(std::memcmp(w.p, r.p, n) == 0);
    return check::PASS;
  });
}

TEST(store_trace_one_event_per_request) {
  return each_backend([](const std::string& be) {
    TempDir d;
    StoreOptions o = opts(be, {d.path}, 64 << 10);
    o.trace = std::make_shared<TraceRing>(64);
    Store s(o);
    uint64_t obj = s.create(1u << 20);
    EXPECT(round_trip(s, obj, 1000, 300000, 16));  // several sub-requests each way
    std::vector<TraceEvent> ev;
    o.trace->drain(ev);
    EXPECT(ev.size() == 2);
    EXPECT(ev[0].kind == kTraceDiskWrite && ev[1].kind == kTraceDiskRead);
    EXPECT(ev[0].unit == 1 && ev[0].bytes == 300000 && ev[0].t_end >= ev[0].t_start);
    return check::PASS;
  });
}

TEST(store_fixed_buffer_round_trip) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.path}));
    Aligned arena(2u << 20);
    const bool ok = s.register_buffer(arena.p, arena.n);
    if (be == "threadpool") {
      EXPECT(!ok);
      return check::PASS;
    }
    if (!ok) return check::SKIP;  // RLIMIT_MEMLOCK or an old kernel
    uint64_t obj = s.create(1u << 20);
    fill(arena.p, 1u << 20, 17);
    EXPECT(wait_ok(s, s.submit(true, obj, 0, arena.p, 1u << 20, 0)));
    EXPECT(wait_ok(s, s.submit(false, obj, 0, arena.p + (1u << 20), 1u << 20, 0)));
    EXPECT(std::memcmp(arena.p, arena.p + (1u << 20), 1u << 20) == 0);
    return check::PASS;
  });
}

TEST(store_close_removes_everything) {
  return each_backend([](const std::string& be) {
    TempDir d;
    Store s(opts(be, {d.sub("a"), d.sub("b")}, 4096));
    uint64_t obj = s.create(3 * 4096);
    auto files = s.path_of(obj);
    auto runs = s.run_dirs();
    s.remove(s.create(100));
    s.close();
    s.close();
    for (auto& f : files) EXPECT(!exists(f));
    for (auto& r : runs) EXPECT(!exists(r));
    bool raised = false;
    try {
      s.create(1);
    } catch (const std::invalid_argument&) {
      raised = true;
    }
    EXPECT(raised);
    return check::PASS;
  });
}

TEST_MAIN()
