// Whole-file reading and atomic writing, shared by every reader and writer in ropekit, plus the
// pieces of crash-safe output directories: directory sync, atomic symlink switch, an exclusive
// advisory lock per output directory, and a fault-injection hook for tests.
#ifndef ROPEKIT_FILE_H_
#define ROPEKIT_FILE_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

namespace ropekit {

// Reads a whole regular file, or a pipe or character device (e.g. /dev/stdin) to its end.
// Errors (missing, a directory, unreadable, larger than max_bytes) name the path.
std::string ReadFileToString(const std::string& path, uint64_t max_bytes = uint64_t{1} << 40);

// Writes atomically: the bytes go to an exclusive temporary file next to `path` (rename is
// atomic only within a file system), named `<path>.tmp.<pid>.<n>`, which is synced and renamed
// over `path` only when complete. On failure the destination is untouched and the temporary file
// is removed.
void WriteFileAtomic(const std::string& path, const void* data, size_t size);
inline void WriteFileAtomic(const std::string& path, std::string_view data) {
  WriteFileAtomic(path, data.data(), data.size());
}
// The same for the concatenation of `pieces`, written one after another without joining them in
// memory first (a header and a large payload cost no extra copy of the payload).
void WriteFilePiecesAtomic(const std::string& path, std::initializer_list<std::string_view> pieces);

// fsync of a directory, so that renames and new entries in it survive a power loss.
void SyncDirectory(const std::string& dir);

// Points the symbolic link `link` at `target` atomically (a temporary link renamed over it).
void ReplaceSymlink(const std::string& link, const std::string& target);

// Creates `dir` if needed and checks that a file can be created in it; the error names the
// directory and `what` (e.g. "--out").
void CheckDirectoryWritable(const std::string& dir, const std::string& what);

// Removes files whose name contains ".tmp." directly in `dir` (left by a killed writer); returns
// how many. Only call while holding the directory's DirectoryLock.
int RemoveStaleTempFiles(const std::string& dir);

// An exclusive advisory lock (flock) on `<dir>/.ropekit.lock`, held for the object's lifetime.
// The lock file records the holder's pid; a second writer gets an Error naming the directory,
// `what` (e.g. "--out") and that pid. The lock is released by the kernel when the process dies.
class DirectoryLock {
 public:
  DirectoryLock(const std::string& dir, const std::string& what);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

// Fault injection for tests. Every file operation of an atomic write or a checkpoint commit
// calls FaultPoint first. With the environment variable ROPEKIT_FAULT_AT=N, the N-th call in the
// process fires: ROPEKIT_FAULT_MODE=kill sends SIGKILL to the process (a crash at that exact
// point), `enospc` (default) makes the operation fail with "No space left on device", `eio` with
// an I/O error. ROPEKIT_FAULT_TRACE=1 prints every call ("fault point N: op path") to stderr.
// Returns 0 or the errno the operation must fail with.
int FaultPoint(const char* op, const std::string& path);

}  // namespace ropekit

#endif  // ROPEKIT_FILE_H_
