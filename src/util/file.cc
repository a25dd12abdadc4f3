#include "ropekit/file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ropekit/error.h"

namespace ropekit {
namespace {

std::atomic<unsigned> g_temp_counter{0};

std::string TempName(const std::string& path) {
  return path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(g_temp_counter++);
}

}  // namespace

int FaultPoint(const char* op, const std::string& path) {
  static std::atomic<int64_t> calls{0};
  static const int64_t fire_at = [] {
    const char* v = std::getenv("ROPEKIT_FAULT_AT");
    return v ? std::strtoll(v, nullptr, 10) : int64_t{0};
  }();
  static const bool trace = std::getenv("ROPEKIT_FAULT_TRACE") != nullptr;
  const int64_t n = ++calls;
  if (trace)
    std::fprintf(stderr, "fault point %lld: %s %s\n", static_cast<long long>(n), op, path.c_str());
  if (fire_at <= 0 || n != fire_at) return 0;
  const char* mode = std::getenv("ROPEKIT_FAULT_MODE");
  const std::string m = mode ? mode : "enospc";
  if (m == "kill") {
    std::fflush(nullptr);
    ::kill(::getpid(), SIGKILL);
    ::pause();
  }
  return m == "eio" ? EIO : ENOSPC;
}

namespace {

// Reads a pipe or a character device to its end (its size is not known in advance); closes fd.
std::string ReadStream(int fd, const std::string& path, uint64_t max_bytes) {
  std::string bytes;
  char chunk[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, chunk, sizeof(chunk));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int err = errno;
      ::close(fd);
      throw Error(path + ": read error: " + std::strerror(err));
    }
    if (got == 0) break;
    bytes.append(chunk, static_cast<size_t>(got));
    if (bytes.size() > max_bytes) {
      ::close(fd);
      throw Error(path + ": more than the limit of " + std::to_string(max_bytes) +
                  " bytes for this kind of file");
    }
  }
  ::close(fd);
  return bytes;
}

}  // namespace

std::string ReadFileToString(const std::string& path, uint64_t max_bytes) {
  // POSIX calls, so that a directory or an unreadable file is reported as such (an
  // std::ifstream opens a directory and then reads zero bytes).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open for reading: " + std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  if (stat_ok && (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode))) {
    return ReadStream(fd, path, max_bytes);
  }
  if (!stat_ok || !S_ISREG(st.st_mode)) {
    const bool dir = S_ISDIR(st.st_mode);
    ::close(fd);
    throw Error(path + (dir ? ": is a directory, not a file" : ": not a regular file"));
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    throw Error(path + ": " + std::to_string(st.st_size) + " bytes, more than the limit of " +
                std::to_string(max_bytes) + " bytes for this kind of file");
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t got = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      const int err = errno;
      ::close(fd);
      throw Error(path + ": read error: " +
                  (got == 0 ? std::string("file shrank while reading") : std::strerror(err)));
    }
    done += static_cast<size_t>(got);
  }
  ::close(fd);
  return bytes;
}

void WriteFileAtomic(const std::string& path, const void* data, size_t size) {
  WriteFilePiecesAtomic(path, {std::string_view(static_cast<const char*>(data), size)});
}

namespace {

// Writes all of `data` to `fd`; returns 0 or the errno of the failure.
int WriteAll(int fd, std::string_view data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t put = ::write(fd, data.data() + done, data.size() - done);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) return put < 0 ? errno : EIO;
    done += static_cast<size_t>(put);
  }
  return 0;
}

}  // namespace

void WriteFilePiecesAtomic(const std::string& path,
                           std::initializer_list<std::string_view> pieces) {
  // The temporary file lives next to the destination (rename is atomic only within a file
  // system); O_EXCL never clobbers an existing file, mode 0666 lets the umask decide as for a
  // plain create.
  std::string tmp;
  int fd = -1;
  int err = FaultPoint("create", path);
  for (int attempt = 0; err == 0 && attempt < 100 && fd < 0; ++attempt) {
    tmp = TempName(path);
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) err = errno;
  }
  if (fd < 0) throw Error(path + ": cannot open for writing: " + std::strerror(err ? err : EEXIST));
  err = FaultPoint("write", tmp);
  // A simulated full disk writes part of the data first, as a real one would.
  if (err != 0 && pieces.size() > 0) {
    const std::string_view first = *pieces.begin();
    (void)!::write(fd, first.data(), first.size() / 2);
  }
  for (auto piece = pieces.begin(); err == 0 && piece != pieces.end(); ++piece) {
    err = WriteAll(fd, *piece);
  }
  if (err == 0) err = FaultPoint("fsync", tmp);
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    throw Error(path + ": write failed: " + std::strerror(err));
  }
  err = FaultPoint("rename", path);
  if (err == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    throw Error(path + ": cannot move the temporary file into place: " + std::strerror(err));
  }
}

void SyncDirectory(const std::string& dir) {
  int err = FaultPoint("fsync-dir", dir);
  if (err == 0) {
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      err = errno;
    } else {
      if (::fsync(fd) != 0 && errno != EINVAL) err = errno;
      ::close(fd);
    }
  }
  if (err != 0) throw Error(dir + ": cannot sync the directory: " + std::strerror(err));
}

void ReplaceSymlink(const std::string& link, const std::string& target) {
  const std::string tmp = TempName(link);
  int err = FaultPoint("symlink", link);
  if (err == 0 && ::symlink(target.c_str(), tmp.c_str()) != 0) err = errno;
  if (err != 0) throw Error(link + ": cannot create a symbolic link: " + std::strerror(err));
  err = FaultPoint("rename", link);
  if (err == 0 && std::rename(tmp.c_str(), link.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    throw Error(link + ": cannot move the symbolic link into place: " + std::strerror(err));
  }
}

void CheckDirectoryWritable(const std::string& dir, const std::string& what) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    // Create it (and its parents) the way `mkdir -p` does.
    std::string prefix;
    size_t pos = 0;
    while (pos != std::string::npos) {
      pos = dir.find('/', pos + 1);
      prefix = dir.substr(0, pos);
      if (prefix.empty()) continue;
      if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
        throw Error(what + " " + dir + ": cannot create the directory: " + std::strerror(errno));
      }
    }
  } else if (!S_ISDIR(st.st_mode)) {
    throw Error(what + " " + dir + ": exists and is not a directory");
  }
  const std::string probe = TempName(dir + "/.write-probe");
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) {
    throw Error(what + " " + dir + ": the directory is not writable: " + std::strerror(errno));
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

int RemoveStaleTempFiles(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;
  std::vector<std::string> stale;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.find(".tmp.") != std::string::npos) stale.push_back(dir + "/" + name);
  }
  ::closedir(d);
  int removed = 0;
  for (const std::string& path : stale) removed += ::unlink(path.c_str()) == 0;
  return removed;
}

DirectoryLock::DirectoryLock(const std::string& dir, const std::string& what) {
  const std::string path = dir + "/.ropekit.lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0) {
    throw Error(what + " " + dir + ": cannot create the lock file " + path + ": " +
                std::strerror(errno));
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {0};
    const ssize_t got = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK) {
      const long long pid = got > 0 ? std::strtoll(buf, nullptr, 10) : 0;
      throw Error(what + " " + dir + ": the directory is in use by another ropekit process" +
                  (pid > 0 ? " (pid " + std::to_string(pid) + ")" : std::string()) +
                  ", which holds " + path + "; wait for it to finish or choose another directory");
    }
    throw Error(what + " " + dir + ": cannot lock " + path + ": " + std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
    // The lock itself is held; the pid is only informative.
  }
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace ropekit
