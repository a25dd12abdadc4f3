// NumPy .npy file reading and writing (format versions 1.0-3.0, little-endian, C order).
//
// Used by the command line to exchange tensors with Python. Reading validates the magic string,
// the header dictionary, the dtype, the shape and the payload size, and reports every problem as
// ropekit::Error naming the file. Writing is atomic: the data goes to a temporary file in the
// same directory, which is renamed over the destination only when complete.
#ifndef ROPEKIT_SRC_UTIL_NPY_H_
#define ROPEKIT_SRC_UTIL_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "src/util/file.h"

namespace ropekit {

enum class NpyDType { kF32, kF64, kF16, kI32, kI64 };

struct NpyArray {
  NpyDType dtype = NpyDType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // raw little-endian payload, C order

  int64_t NumElements() const;
  size_t ItemSize() const;
};

std::string NpyDTypeName(NpyDType dtype);  // "float32", "float64", "float16", "int32", "int64"

// Parses .npy bytes; `name` is used in error messages.
NpyArray ParseNpy(const std::vector<uint8_t>& file_bytes, const std::string& name);
NpyArray ReadNpy(const std::string& path);
// The magic string, version, header length and padded header dictionary that precede the payload.
std::string NpyHeader(const NpyArray& array);
std::vector<uint8_t> SerializeNpy(const NpyArray& array);
// Writes atomically (temporary file + rename); on failure the destination is untouched.
void WriteNpy(const std::string& path, const NpyArray& array);

}  // namespace ropekit

#endif  // ROPEKIT_SRC_UTIL_NPY_H_
