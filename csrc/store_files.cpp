// Run directories, dead-run reclaim, backing files and the O_DIRECT probe.
// Note [run lock]: a run directory <dir>/offload-run-<pid>-<hex> holds a `lock` file on which its store holds
// flock(LOCK_EX) for its whole life. The lock is taken before the name `lock` exists (O_TMPFILE, then linkat),
// so a reclaimer that can open `lock` and flock it without blocking has proven the owner dead; a directory
// without `lock` may be a run being created and is never touched. flock belongs to the open file description,
// so two stores of one process exclude each other exactly as two processes do.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "store.h"
#include "store_backend.h"

namespace offload {

namespace {

constexpr char kRunPrefix[] = "offload-run-";

uint64_t random64() {
  uint64_t r = 0;
  if (getrandom(&r, sizeof r, GRND_NONBLOCK) != ssize_t(sizeof r)) r = uint64_t(now_ns()) * 0x9E3779B97F4A7C15ull;
  return r;
}

std::string hex_name(const char* prefix) {
  char name[80];
  std::snprintf(name, sizeof name, "%s%d-%016llx", prefix, int(getpid()), (unsigned long long)random64());
  return name;
}

int retry_flock(int fd, int how) {
  int rc;
  do rc = flock(fd, how); while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : -errno;
}

// Note [run lock]: the lock is held before the name appears. Falls back to create-then-lock on filesystems
// without O_TMPFILE, where a reclaimer racing the few instructions in between could misjudge the run dead.
int create_lock(int dfd, int* fd_out) {
  int fd = openat(dfd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) {
    int rc = retry_flock(fd, LOCK_EX | LOCK_NB);
    if (rc == 0 && fchmod(fd, 0600) != 0) rc = -errno;
    if (rc == 0) {
      char proc[64];
      std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
      if (linkat(AT_FDCWD, proc, dfd, "lock", AT_SYMLINK_FOLLOW) != 0 &&
          linkat(fd, "", dfd, "lock", AT_EMPTY_PATH) != 0)
        rc = -errno;
    }
    if (rc == 0) {
      *fd_out = fd;
      return 0;
    }
    ::close(fd);
    if (rc != -ENOENT && rc != -EPERM && rc != -EACCES) return rc;
  } else if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
    return -errno;
  }
  fd = openat(dfd, "lock", O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return -errno;
  int rc = retry_flock(fd, LOCK_EX | LOCK_NB);
  if (rc != 0) {
    ::close(fd);
    return rc;
  }
  *fd_out = fd;
  return 0;
}

// Unlinks the regular files of a dead run (never following links) and removes it; true when it is gone.
bool remove_dead_run(int parent_fd, const char* name, int run_fd) {
  int scan = dup(run_fd);
  if (scan < 0) return false;
  DIR* d = fdopendir(scan);
  if (!d) {
    ::close(scan);
    return false;
  }
  while (dirent* e = readdir(d)) {
    struct stat st;
    if (fstatat(run_fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode))
      unlinkat(run_fd, e->d_name, 0);
  }
  closedir(d);
  return unlinkat(parent_fd, name, AT_REMOVEDIR) == 0;
}

}  // namespace

int check_dir_writable(const std::string& dir) {
  struct stat st;
  if (stat(dir.c_str(), &st) != 0) return -errno;
  if (!S_ISDIR(st.st_mode)) return -ENOTDIR;
  if (access(dir.c_str(), W_OK | X_OK) != 0) return -errno;
  return 0;
}

unsigned reclaim_dead_runs(const std::string& dir) {
  int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return 0;
  int scan = dup(dfd);
  DIR* d = scan >= 0 ? fdopendir(scan) : nullptr;
  if (!d) {
    if (scan >= 0) ::close(scan);
    ::close(dfd);
    return 0;
  }
  unsigned n = 0;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, kRunPrefix, sizeof kRunPrefix - 1) != 0) continue;
    struct stat st;
    if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid()) continue;
    int rfd = openat(dfd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (rfd < 0) continue;
    int lfd = openat(rfd, "lock", O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (lfd >= 0) {
      // EWOULDBLOCK: a live run. Anything else we cannot judge, so we leave it too.
      if (retry_flock(lfd, LOCK_EX | LOCK_NB) == 0 && remove_dead_run(dfd, e->d_name, rfd)) ++n;
      ::close(lfd);
    }
    ::close(rfd);
  }
  closedir(d);
  ::close(dfd);
  return n;
}

int make_run_dir(const std::string& dir, RunDir* out) {
  for (int attempt = 0; attempt < 8; ++attempt) {
    std::string path = dir + "/" + hex_name(kRunPrefix);
    if (mkdir(path.c_str(), 0700) != 0) {
      if (errno == EEXIST) continue;
      return -errno;
    }
    int rc = 0, lock_fd = -1;
    int dfd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) rc = -errno;
    if (rc == 0 && fchmod(dfd, 0700) != 0) rc = -errno;  // the umask may have cleared owner bits
    if (rc == 0) rc = create_lock(dfd, &lock_fd);
    if (dfd >= 0) ::close(dfd);
    if (rc != 0) {
      rmdir(path.c_str());
      return rc;
    }
    out->path = path;
    out->lock_fd = lock_fd;
    return 0;
  }
  return -EEXIST;
}

void remove_run_dir(RunDir* rd) noexcept {
  if (rd->path.empty()) return;
  // Unlinked while still locked, so no reclaimer can mistake the half-removed directory for a dead run.
  unlink((rd->path + "/lock").c_str());
  rmdir(rd->path.c_str());
  if (rd->lock_fd >= 0) ::close(rd->lock_fd);
  rd->lock_fd = -1;
  rd->path.clear();
}

int create_backing_file(const std::string& path, bool direct, uint64_t size, int* fd_out) {
  int flags = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | (direct ? O_DIRECT : 0);
  int fd = open(path.c_str(), flags, 0600);
  if (fd < 0) return -errno;
  int rc = fchmod(fd, 0600) == 0 ? 0 : -errno;
  // Reserving the blocks up front turns a full disk into an error at create() rather than mid-step.
  if (rc == 0 && size > 0) {
    int e;
    do e = posix_fallocate(fd, 0, off_t(size)); while (e == EINTR);
    if (e == EOPNOTSUPP || e == ENOSYS || e == EINVAL) e = ftruncate(fd, off_t(size)) == 0 ? 0 : errno;
    rc = -e;
  }
  if (rc != 0) {
    ::close(fd);
    unlink(path.c_str());
    return rc;
  }
  *fd_out = fd;
  return 0;
}

// Opens a scratch file in dir with O_DIRECT, asks statx for the DIO alignment, and proves it with one
// aligned write and read: some filesystems accept the flag at open and refuse the I/O.
int probe_in(const std::string& dir, DirectProbe* out) {
  std::string path = dir + "/" + hex_name(".offload-probe-");
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_DIRECT, 0600);
  if (fd < 0) {
    if (errno != EINVAL && errno != EOPNOTSUPP) return -errno;
    *out = {false, 1, std::string("filesystem refuses O_DIRECT (open: ") + std::strerror(errno) + ")"};
    return 0;
  }
  uint32_t align = 4096;
  std::string reason = "O_DIRECT accepted; statx reports no DIO alignment, assuming 4096";
#ifdef STATX_DIOALIGN
  struct statx stx;
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN)) {
    if (stx.stx_dio_offset_align == 0) {
      ::close(fd);
      unlink(path.c_str());
      *out = {false, 1, "filesystem refuses O_DIRECT (statx: no DIO support)"};
      return 0;
    }
    align = std::max(stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    reason = "O_DIRECT accepted; alignment from statx STATX_DIOALIGN";
  }
#endif
  void* buf = nullptr;
  int rc = posix_memalign(&buf, std::max<size_t>(align, sizeof(void*)), align);
  if (rc != 0) {
    ::close(fd);
    unlink(path.c_str());
    return -rc;
  }
  std::memset(buf, 0xA5, align);
  ssize_t w, r = -1;
  do w = pwrite(fd, buf, align, 0); while (w < 0 && errno == EINTR);
  if (w == ssize_t(align)) do r = pread(fd, buf, align, 0); while (r < 0 && errno == EINTR);
  int io_err = w < 0 || r < 0 ? errno : 0;
  std::free(buf);
  ::close(fd);
  unlink(path.c_str());
  if (io_err != 0 && io_err != EINVAL) return -io_err;
  if (io_err == EINVAL || w != ssize_t(align) || r != ssize_t(align))
    *out = {false, 1, "filesystem refuses O_DIRECT I/O (" + std::string(std::strerror(io_err ? io_err : EIO)) + ")"};
  else
    *out = {true, align, reason};
  return 0;
}

DirectProbe probe_direct(const std::string& dir) {
  int rc = check_dir_writable(dir);
  DirectProbe p;
  if (rc == 0) rc = probe_in(dir, &p);
  if (rc != 0) throw IoError("open", dir, 0, 0, -rc);
  return p;
}

}  // namespace offload
