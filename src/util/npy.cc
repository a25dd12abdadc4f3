#include "ropekit/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string_view>

#include "ropekit/error.h"

namespace ropekit {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
constexpr int64_t kMaxDim = int64_t{1} << 40;

struct DTypeInfo {
  NpyDType dtype;
  const char* descr;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {NpyDType::kF32, "<f4", 4}, {NpyDType::kF64, "<f8", 8}, {NpyDType::kF16, "<f2", 2},
    {NpyDType::kI32, "<i4", 4}, {NpyDType::kI64, "<i8", 8},
};

const DTypeInfo& Info(NpyDType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  throw Error("npy: unknown dtype");
}

[[noreturn]] void Fail(const std::string& name, const std::string& what) {
  throw Error(name + ": not a valid .npy file: " + what);
}

void SkipSpaces(std::string_view s, size_t& i) {
  while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
}

// Reads a quoted Python string literal starting at s[i].
std::string ReadQuoted(std::string_view s, size_t& i, const std::string& name) {
  if (i >= s.size() || (s[i] != '\'' && s[i] != '"'))
    Fail(name, "expected a quoted string in header");
  const char quote = s[i++];
  const size_t start = i;
  while (i < s.size() && s[i] != quote) ++i;
  if (i >= s.size()) Fail(name, "unterminated string in header");
  return std::string(s.substr(start, i++ - start));
}

}  // namespace

int64_t NpyArray::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t NpyArray::ItemSize() const { return Info(dtype).size; }

std::string NpyDTypeName(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::kF32:
      return "float32";
    case NpyDType::kF64:
      return "float64";
    case NpyDType::kF16:
      return "float16";
    case NpyDType::kI32:
      return "int32";
    case NpyDType::kI64:
      return "int64";
  }
  return "unknown";
}

namespace {

// The header dict's text after the magic string, version and length; *data_offset: where the
// payload starts.
std::string_view LocateHeader(const std::vector<uint8_t>& bytes, const std::string& name,
                              size_t* data_offset) {
  if (bytes.size() < kMagicSize + 4 || std::memcmp(bytes.data(), kMagic, kMagicSize) != 0) {
    Fail(name, "missing the \\x93NUMPY magic string");
  }
  const int major = bytes[6];
  size_t header_len = 0;
  size_t offset = 0;
  if (major == 1) {
    header_len = bytes[8] | (size_t{bytes[9]} << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) Fail(name, "truncated header");
    header_len =
        bytes[8] | (size_t{bytes[9]} << 8) | (size_t{bytes[10]} << 16) | (size_t{bytes[11]} << 24);
    offset = 12;
  } else {
    Fail(name, "unsupported format version " + std::to_string(major));
  }
  if (header_len > bytes.size() - offset) Fail(name, "truncated header");
  *data_offset = offset + header_len;
  return std::string_view(reinterpret_cast<const char*>(bytes.data()) + offset, header_len);
}

// The value of 'fortran_order' at header[i]: True or False.
bool ReadFortranOrder(std::string_view header, size_t& i, const std::string& name) {
  if (header.substr(i, 4) == "True") {
    i += 4;
    return true;
  }
  if (header.substr(i, 5) == "False") {
    i += 5;
    return false;
  }
  Fail(name, "fortran_order must be True or False");
}

// The value of 'shape' at header[i]: a tuple of non-negative ints ("(4,)", "(4, 2)", "()"; "(4)"
// is an int and "(4 2)" is no literal).
std::vector<int64_t> ReadShapeTuple(std::string_view header, size_t& i, const std::string& name) {
  if (i >= header.size() || header[i] != '(') Fail(name, "shape must be a tuple");
  ++i;
  std::vector<int64_t> shape;
  bool comma = false;
  for (;;) {
    SkipSpaces(header, i);
    if (i < header.size() && header[i] == ')') {
      ++i;
      break;
    }
    int64_t dim = 0;
    size_t digits = 0;
    while (i < header.size() && header[i] >= '0' && header[i] <= '9') {
      dim = dim * 10 + (header[i] - '0');
      if (dim > kMaxDim) Fail(name, "shape dimension too large");
      ++i;
      ++digits;
    }
    if (digits == 0) Fail(name, "bad shape entry");
    shape.push_back(dim);
    SkipSpaces(header, i);
    comma = i < header.size() && header[i] == ',';
    if (comma) {
      ++i;
    } else if (i >= header.size() || header[i] != ')') {
      Fail(name, "shape entries must be separated by commas");
    }
  }
  if (shape.size() == 1 && !comma) Fail(name, "shape (n) is an int, not a tuple: use (n,)");
  return shape;
}

struct HeaderFields {
  std::string descr;
  bool fortran = false;
  std::vector<int64_t> shape;
};

// The header is the Python dict literal numpy writes (numpy.lib.format, read there with
// ast.literal_eval): {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } followed by
// spaces and a newline. Read strictly: exactly the keys descr, fortran_order and shape, each
// once, a tuple shape, commas between items, and nothing but padding after the closing brace.
HeaderFields ParseHeaderDict(std::string_view header, const std::string& name) {
  HeaderFields h;
  bool have_descr = false, have_order = false, have_shape = false;
  size_t i = 0;
  SkipSpaces(header, i);
  if (i >= header.size() || header[i] != '{') Fail(name, "header is not a dict");
  ++i;
  for (;;) {
    SkipSpaces(header, i);
    if (i < header.size() && header[i] == '}') break;
    const std::string key = ReadQuoted(header, i, name);
    SkipSpaces(header, i);
    if (i >= header.size() || header[i] != ':') Fail(name, "expected ':' in header");
    ++i;
    SkipSpaces(header, i);
    bool* seen = key == "descr"           ? &have_descr
                 : key == "fortran_order" ? &have_order
                 : key == "shape"         ? &have_shape
                                          : nullptr;
    if (!seen) Fail(name, "unexpected header key '" + key + "'");
    if (*seen) Fail(name, "header key '" + key + "' appears twice");
    *seen = true;
    if (key == "descr") {
      h.descr = ReadQuoted(header, i, name);
    } else if (key == "fortran_order") {
      h.fortran = ReadFortranOrder(header, i, name);
    } else {
      h.shape = ReadShapeTuple(header, i, name);
    }
    SkipSpaces(header, i);
    if (i >= header.size()) Fail(name, "unterminated header dict");
    if (header[i] == ',') {
      ++i;
    } else if (header[i] != '}') {
      Fail(name, "expected ',' or '}' after the value of '" + key + "'");
    }
  }
  ++i;  // the closing brace
  for (; i < header.size(); ++i) {
    if (header[i] != ' ' && header[i] != '\n') {
      Fail(name, "unexpected bytes after the header dict (only space padding and a newline)");
    }
  }
  if (!have_descr || !have_order || !have_shape)
    Fail(name, "header lacks descr, fortran_order or shape");
  return h;
}

NpyDType DTypeFromDescr(const std::string& descr, const std::string& name) {
  bool known = false;
  NpyDType dtype = NpyDType::kF32;
  for (const auto& info : kDTypes) {
    if (descr == info.descr || (info.size == 1 && descr == std::string("|") + (info.descr + 1))) {
      dtype = info.dtype;
      known = true;
    }
  }
  if (!known) {
    throw Error(name + ": unsupported dtype '" + descr +
                "' (accepted: float32 <f4, float16 <f2, float64 <f8, int32 <i4, int64 <i8)");
  }
  return dtype;
}

// Elements of `shape`, checked against overflow of the payload's byte count.
int64_t CheckedCount(const std::vector<int64_t>& shape, const std::string& name) {
  int64_t count = 1;
  for (int64_t d : shape) {
    if (d != 0 && count > std::numeric_limits<int64_t>::max() / 8 / d)
      Fail(name, "shape too large");
    count *= d;
  }
  return count;
}

}  // namespace

NpyArray ParseNpy(const std::vector<uint8_t>& bytes, const std::string& name) {
  size_t data_offset = 0;
  const HeaderFields h = ParseHeaderDict(LocateHeader(bytes, name, &data_offset), name);
  if (h.fortran) {
    Fail(name, "Fortran-ordered arrays are not supported (use numpy.ascontiguousarray)");
  }
  NpyArray array;
  array.dtype = DTypeFromDescr(h.descr, name);
  array.shape = h.shape;
  const size_t payload = static_cast<size_t>(CheckedCount(h.shape, name)) * array.ItemSize();
  if (bytes.size() - data_offset != payload) {
    Fail(name, "payload has " + std::to_string(bytes.size() - data_offset) +
                   " bytes, shape needs " + std::to_string(payload));
  }
  array.bytes.assign(bytes.begin() + data_offset, bytes.end());
  return array;
}

NpyArray ReadNpy(const std::string& path) {
  const std::string file = ReadFileToString(path);
  return ParseNpy(std::vector<uint8_t>(file.begin(), file.end()), path);
}

std::string NpyHeader(const NpyArray& array) {
  std::string header = "{'descr': '" + std::string(Info(array.dtype).descr) +
                       "', 'fortran_order': False, 'shape': (";
  for (size_t k = 0; k < array.shape.size(); ++k) {
    header += std::to_string(array.shape[k]);
    header += (array.shape.size() == 1 || k + 1 < array.shape.size()) ? ", " : "";
  }
  if (array.shape.size() == 1) header.pop_back();  // "(5,)"
  header += "), }";
  // Version 1.0 stores the header length in 2 bytes; longer headers need version 2.0 (4 bytes).
  const bool v2 = header.size() + 1 + 64 > 0xffff;
  const size_t prefix = kMagicSize + 2 + (v2 ? 4 : 2);
  // Pad with spaces so that the data starts at a multiple of 64 bytes; newline terminated.
  const size_t unpadded = prefix + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string out(kMagic, kMagicSize);
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back(0);
  const size_t len_bytes = v2 ? 4 : 2;
  for (size_t b = 0; b < len_bytes; ++b) {
    out.push_back(static_cast<char>((header.size() >> (8 * b)) & 0xff));
  }
  return out + header;
}

std::vector<uint8_t> SerializeNpy(const NpyArray& array) {
  const std::string header = NpyHeader(array);
  std::vector<uint8_t> out(header.begin(), header.end());
  out.insert(out.end(), array.bytes.begin(), array.bytes.end());
  return out;
}

void WriteNpy(const std::string& path, const NpyArray& array) {
  if (static_cast<size_t>(array.NumElements()) * array.ItemSize() != array.bytes.size()) {
    throw Error(path + ": internal error: payload size does not match shape");
  }
  // The payload is written in place after the header: no second copy of a large array.
  WriteFilePiecesAtomic(
      path, {NpyHeader(array), std::string_view(reinterpret_cast<const char*>(array.bytes.data()),
                                                array.bytes.size())});
}

}  // namespace ropekit
