// Whole-file reading and atomic writing, shared by every reader and writer in ropekit.
#ifndef ROPEKIT_SRC_UTIL_FILE_H_
#define ROPEKIT_SRC_UTIL_FILE_H_

#include <cstddef>
#include <string>
#include <string_view>

namespace ropekit {

// Reads a whole regular file. Errors (missing, a directory, unreadable) name the path.
std::string ReadFileToString(const std::string& path);

// Writes atomically: the bytes go to an exclusive temporary file next to `path` (rename is
// atomic only within a file system), which is synced and renamed over `path` only when complete.
// On failure the destination is untouched and the temporary file is removed.
void WriteFileAtomic(const std::string& path, const void* data, size_t size);
inline void WriteFileAtomic(const std::string& path, std::string_view data) {
  WriteFileAtomic(path, data.data(), data.size());
}

}  // namespace ropekit

#endif  // ROPEKIT_SRC_UTIL_FILE_H_
