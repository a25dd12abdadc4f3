// Tests of the .npy reader and writer (ropekit/npy.h): round trips of every dtype and of 0-d,
// 1-d, empty and many-dimensional shapes, the 64-byte header alignment of the format
// specification (numpy/lib/format.py: "the total of len(magic string) + 2 + len(length) +
// HEADER_LEN be evenly divisible by 64"), version 2.0/3.0 headers, malformed files, and a
// seeded fuzz test: ParseNpy either returns an array whose payload matches its shape or throws
// ropekit::Error, never anything else.
#include "ropekit/npy.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "ropekit/error.h"

namespace ropekit {
namespace {

namespace fs = std::filesystem;

constexpr NpyDType kAllDTypes[] = {NpyDType::kF32, NpyDType::kF64, NpyDType::kF16, NpyDType::kI32,
                                   NpyDType::kI64};

NpyArray MakeArray(NpyDType dtype, std::vector<int64_t> shape, uint32_t seed) {
  NpyArray a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  a.bytes.resize(static_cast<size_t>(a.NumElements()) * a.ItemSize());
  std::mt19937 rng(seed);
  for (auto& b : a.bytes) b = static_cast<uint8_t>(rng());
  return a;
}

std::vector<uint8_t> Bytes(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}

// Builds a file by hand: magic, version, little-endian header length of `len_bytes` bytes.
std::vector<uint8_t> HandMade(int major, const std::string& header, size_t payload_bytes,
                              size_t len_bytes) {
  std::vector<uint8_t> out = Bytes(std::string("\x93NUMPY", 6));
  out.push_back(static_cast<uint8_t>(major));
  out.push_back(0);
  for (size_t b = 0; b < len_bytes; ++b) {
    out.push_back(static_cast<uint8_t>((header.size() >> (8 * b)) & 0xff));
  }
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + payload_bytes, 0x5a);
  return out;
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "ropekit_npy_test_XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    if (made == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = made;
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::vector<std::string> Entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename());
    return names;
  }

 private:
  fs::path path_;
};

TEST(NpyTest, RoundTripEveryDTypeAndShape) {
  const std::vector<std::vector<int64_t>> shapes = {
      {}, {0}, {1}, {7}, {2, 3}, {3, 0}, {0, 5, 2}, {2, 3, 4}, {1, 1, 1, 1, 1, 3}, {4, 2, 80}};
  uint32_t seed = 1;
  for (NpyDType dtype : kAllDTypes) {
    for (const auto& shape : shapes) {
      const NpyArray a = MakeArray(dtype, shape, seed++);
      const std::vector<uint8_t> file = SerializeNpy(a);
      const size_t payload = a.bytes.size();
      ASSERT_GE(file.size(), payload);
      // The data starts at a multiple of 64 bytes and the header ends with a newline.
      EXPECT_EQ((file.size() - payload) % 64, 0u) << NpyDTypeName(dtype);
      EXPECT_EQ(file[file.size() - payload - 1], '\n');
      const NpyArray b = ParseNpy(file, "mem");
      EXPECT_EQ(b.dtype, dtype);
      EXPECT_EQ(b.shape, shape);
      EXPECT_EQ(b.bytes, a.bytes);
      EXPECT_EQ(b.NumElements() * static_cast<int64_t>(b.ItemSize()),
                static_cast<int64_t>(b.bytes.size()));
    }
  }
}

TEST(NpyTest, ItemSizesAndNames) {
  EXPECT_EQ(MakeArray(NpyDType::kF16, {}, 0).ItemSize(), 2u);
  EXPECT_EQ(MakeArray(NpyDType::kF32, {}, 0).ItemSize(), 4u);
  EXPECT_EQ(MakeArray(NpyDType::kF64, {}, 0).ItemSize(), 8u);
  EXPECT_EQ(MakeArray(NpyDType::kI32, {}, 0).ItemSize(), 4u);
  EXPECT_EQ(MakeArray(NpyDType::kI64, {}, 0).ItemSize(), 8u);
  EXPECT_EQ(NpyDTypeName(NpyDType::kF16), "float16");
  EXPECT_EQ(NpyDTypeName(NpyDType::kI64), "int64");
  EXPECT_EQ(MakeArray(NpyDType::kF32, {}, 0).NumElements(), 1);  // 0-d: one element
  EXPECT_EQ(MakeArray(NpyDType::kF32, {4, 0, 3}, 0).NumElements(), 0);
}

TEST(NpyTest, HeaderTextMatchesTheFormat) {
  // Version 1.0: 10-byte prefix, then the dict literal padded with spaces to 128 bytes in all.
  NpyArray a = MakeArray(NpyDType::kF32, {2, 3}, 7);
  const std::vector<uint8_t> file = SerializeNpy(a);
  ASSERT_EQ(file.size(), 128u + 24u);
  EXPECT_EQ(std::memcmp(file.data(), "\x93NUMPY\x01\x00", 8), 0);
  EXPECT_EQ(file[8] | (file[9] << 8), 118);
  const std::string header(file.begin() + 10, file.begin() + 128);
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  EXPECT_EQ(header.substr(0, dict.size()), dict);
  EXPECT_EQ(header.find_first_not_of(' ', dict.size()), header.size() - 1);
  // 1-d shapes are written as a one-element tuple "(5,)", 0-d as "()".
  const auto text = [](const NpyArray& x) {
    const std::vector<uint8_t> f = SerializeNpy(x);
    return std::string(f.begin(), f.end() - static_cast<std::ptrdiff_t>(x.bytes.size()));
  };
  EXPECT_NE(text(MakeArray(NpyDType::kI64, {5}, 0)).find("'shape': (5,)"), std::string::npos);
  EXPECT_NE(text(MakeArray(NpyDType::kF16, {}, 0)).find("'shape': ()"), std::string::npos);
  EXPECT_NE(text(MakeArray(NpyDType::kF16, {}, 0)).find("'descr': '<f2'"), std::string::npos);
}

TEST(NpyTest, ReadsVersion2And3Headers) {
  const std::string header = "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }\n";
  for (int major : {2, 3}) {
    const NpyArray a = ParseNpy(HandMade(major, header, 12, 4), "v" + std::to_string(major));
    EXPECT_EQ(a.dtype, NpyDType::kI32);
    EXPECT_EQ(a.shape, std::vector<int64_t>{3});
    EXPECT_EQ(a.bytes.size(), 12u);
  }
  // A version 2.0 header longer than 65535 bytes (many dimensions).
  std::string big = "{'descr': '<f8', 'fortran_order': False, 'shape': (";
  for (int k = 0; k < 30000; ++k) big += "1, ";
  big += "2), }\n";
  const NpyArray b = ParseNpy(HandMade(2, big, 16, 4), "big");
  EXPECT_EQ(b.shape.size(), 30001u);
  EXPECT_EQ(b.NumElements(), 2);
}

TEST(NpyTest, WritesVersion2WhenTheHeaderDoesNotFitVersion1) {
  NpyArray a;
  a.dtype = NpyDType::kF32;
  a.shape.assign(25000, 1);
  a.shape.back() = 3;
  a.bytes.assign(12, 0x3f);
  const std::vector<uint8_t> file = SerializeNpy(a);
  EXPECT_EQ(file[6], 2);
  EXPECT_EQ((file.size() - a.bytes.size()) % 64, 0u);
  const NpyArray b = ParseNpy(file, "v2");
  EXPECT_EQ(b.shape, a.shape);
  EXPECT_EQ(b.bytes, a.bytes);
}

TEST(NpyTest, AcceptsHeaderVariants) {
  // Key order, double quotes, no trailing comma and extra spaces are all valid Python literals.
  const std::string h = "{ \"shape\" : ( 2 , 2 ) , \"descr\":\"<f8\",'fortran_order':False}\n";
  const NpyArray a = ParseNpy(HandMade(1, h, 32, 2), "variant");
  EXPECT_EQ(a.dtype, NpyDType::kF64);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 2}));
}

void ExpectError(const std::vector<uint8_t>& file, const std::string& needle) {
  try {
    ParseNpy(file, "bad.npy");
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("bad.npy"), std::string::npos) << what;
    EXPECT_NE(what.find(needle), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << "multi-line message: " << what;
  }
}

TEST(NpyTest, RejectsMalformedFiles) {
  const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n";
  ExpectError({}, "magic");
  ExpectError(Bytes("\x93NUMPX\x01\x00\x00\x00"), "magic");
  ExpectError(HandMade(4, ok, 8, 2), "version 4");
  ExpectError(HandMade(1, ok, 4, 2), "payload has 4 bytes, shape needs 8");
  ExpectError(HandMade(1, ok, 12, 2), "payload has 12 bytes, shape needs 8");
  ExpectError(HandMade(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8, 2),
              "unsupported dtype '>f4'");
  ExpectError(HandMade(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }", 2, 2),
              "unsupported dtype '|u1'");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 8, 2),
              "Fortran");
  ExpectError(HandMade(1, "{'descr': '<f4', 'shape': (2,), }", 8, 2), "lacks");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 8, 2),
              "shape");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': [2], }", 8, 2),
              "tuple");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", 8, 2),
              "unterminated");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8, 2),
              "unexpected header key 'x'");
  ExpectError(HandMade(1,
                       "{'descr': '<f4', 'fortran_order': False, "
                       "'shape': (1099511627776, 1099511627776), }",
                       8, 2),
              "shape too large");
  // Strict Python-literal reading (numpy.lib.format writes exactly one dict, then padding).
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\nxyz", 8, 2),
              "after the header dict");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4 2 8), }", 256, 2),
              "separated by commas");
  ExpectError(
      HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (2,)}", 8, 2),
      "'shape' appears twice");
  ExpectError(HandMade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2), }", 8, 2),
              "not a tuple");
  ExpectError(HandMade(1, "{'descr': '<f4' 'fortran_order': False, 'shape': (2,), }", 8, 2),
              "expected ',' or '}'");
  // Header length pointing past the end of the file.
  std::vector<uint8_t> truncated = HandMade(1, ok, 8, 2);
  truncated.resize(30);
  ExpectError(truncated, "truncated header");
  ExpectError(Bytes(std::string("\x93NUMPY\x02\x00\x05\x00", 10)), "truncated header");
}

TEST(NpyTest, FuzzedFilesParseConsistentlyOrThrowError) {
  std::vector<std::vector<uint8_t>> seeds;
  uint32_t s = 100;
  for (NpyDType dtype : kAllDTypes) {
    seeds.push_back(SerializeNpy(MakeArray(dtype, {3, 2, 4}, s++)));
    seeds.push_back(SerializeNpy(MakeArray(dtype, {}, s++)));
    seeds.push_back(SerializeNpy(MakeArray(dtype, {5}, s++)));
  }
  seeds.push_back(
      HandMade(2, "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 1), }\n", 16, 4));
  // Characters that matter to the header grammar, to mutate into.
  const std::string grammar =
      "{}()[],:'\" \t\n0123456789-TrueFalsedescrshapefortran_order<>|f248iu";
  std::mt19937_64 rng(20240521);
  int parsed = 0, rejected = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> f = seeds[rng() % seeds.size()];
    const int mutations = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < mutations; ++m) {
      const size_t header_end = std::min<size_t>(f.size(), 128);
      const size_t pos = f.empty() ? 0 : rng() % (rng() % 4 == 0 ? f.size() : header_end);
      switch (rng() % 6) {
        case 0:  // random byte
          if (!f.empty()) f[pos] = static_cast<uint8_t>(rng());
          break;
        case 1:  // grammar character
          if (!f.empty()) f[pos] = static_cast<uint8_t>(grammar[rng() % grammar.size()]);
          break;
        case 2:  // truncate
          f.resize(f.empty() ? 0 : rng() % f.size());
          break;
        case 3:  // insert
          f.insert(f.begin() + static_cast<std::ptrdiff_t>(std::min(pos, f.size())),
                   static_cast<uint8_t>(grammar[rng() % grammar.size()]));
          break;
        case 4:  // erase
          if (!f.empty()) f.erase(f.begin() + static_cast<std::ptrdiff_t>(pos));
          break;
        case 5:  // header length field
          if (f.size() > 9) f[8 + rng() % 2] = static_cast<uint8_t>(rng());
          break;
      }
    }
    try {
      const NpyArray a = ParseNpy(f, "fuzz");
      ASSERT_GE(a.NumElements(), 0);
      ASSERT_EQ(static_cast<size_t>(a.NumElements()) * a.ItemSize(), a.bytes.size());
      ASSERT_LE(a.bytes.size(), f.size());
      ++parsed;
    } catch (const Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << "ParseNpy threw a non-ropekit exception: " << e.what();
    }
  }
  // Both outcomes must actually occur, or the mutations are not exercising the parser.
  EXPECT_GT(parsed, 100);
  EXPECT_GT(rejected, 1000);
}

TEST(NpyTest, FileRoundTripAndAtomicWrite) {
  TempDir dir;
  const std::string path = (dir.path() / "x.npy").string();
  const NpyArray a = MakeArray(NpyDType::kF16, {3, 4}, 9);
  WriteNpy(path, a);
  NpyArray b = ReadNpy(path);
  EXPECT_EQ(b.bytes, a.bytes);
  EXPECT_EQ(b.shape, a.shape);
  // Overwriting replaces the file; no temporary file is left behind.
  const NpyArray c = MakeArray(NpyDType::kI64, {2}, 10);
  WriteNpy(path, c);
  b = ReadNpy(path);
  EXPECT_EQ(b.dtype, NpyDType::kI64);
  EXPECT_EQ(b.bytes, c.bytes);
  EXPECT_EQ(dir.Entries(), std::vector<std::string>{"x.npy"});
}

TEST(NpyTest, WriteErrorsLeaveNothingBehind) {
  TempDir dir;
  const NpyArray a = MakeArray(NpyDType::kF32, {2}, 11);
  // Destination is a directory: the rename fails and the temporary file is removed.
  fs::create_directory(dir.path() / "sub");
  EXPECT_THROW(WriteNpy((dir.path() / "sub").string(), a), Error);
  EXPECT_EQ(dir.Entries(), std::vector<std::string>{"sub"});
  EXPECT_TRUE(fs::is_empty(dir.path() / "sub"));
  // Missing parent directory.
  try {
    WriteNpy((dir.path() / "missing" / "y.npy").string(), a);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("y.npy"), std::string::npos) << e.what();
  }
  // Payload inconsistent with the shape is refused before anything is written.
  NpyArray bad = a;
  bad.bytes.pop_back();
  EXPECT_THROW(WriteNpy((dir.path() / "z.npy").string(), bad), Error);
  EXPECT_FALSE(fs::exists(dir.path() / "z.npy"));
  // A directory the process may not create files in: a mode 0555 directory, or, for root (who
  // ignores permission bits), the procfs root, which refuses new files for everyone.
  const bool root = ::geteuid() == 0;
  const fs::path locked = root ? fs::path("/proc") : dir.path() / "locked";
  if (!root) {
    fs::create_directory(locked);
    fs::permissions(locked, fs::perms::owner_read | fs::perms::owner_exec);
  }
  EXPECT_THROW(WriteNpy((locked / "ropekit_npy_test.npy").string(), a), Error);
  EXPECT_FALSE(fs::exists(locked / "ropekit_npy_test.npy"));
}

TEST(NpyTest, ReadErrorsNameThePath) {
  TempDir dir;
  const auto expect = [](const std::string& path, const std::string& needle) {
    try {
      ReadNpy(path);
      ADD_FAILURE() << "no error for " << path;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(path), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << what;
    }
  };
  expect((dir.path() / "absent.npy").string(), "cannot open");
  expect(dir.path().string(), "directory");
  const std::string empty = (dir.path() / "empty.npy").string();
  WriteFileAtomic(empty, "", 0);
  expect(empty, "magic");
}

}  // namespace
}  // namespace ropekit
