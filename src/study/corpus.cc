// The study's text: the six Jane Austen novels of Debian's r-cran-janeaustenr package (public
// domain texts), read from R's lazy-load database without R, or any text files given instead.
//
// Formats (R Internals, "Serialization formats" and "Lazy loading"):
//  * XDR serialization: "X\n", then big-endian int32 version, writer version, minimal reader
//    version and (version 3) the native encoding as length + bytes. Each item starts with an
//    int32 flags word: type = flags & 0xff, has attributes = bit 9, has tag = bit 10; vectors
//    carry an int32 length (-1: a 64-bit length follows as two int32) then their elements;
//    CHARSXP (9) is a length (-1 = NA) plus bytes; pairlists (2) carry attributes, tag, car and
//    cdr; symbols (1) and REFSXP (255, index in flags >> 8) share a reference table.
//  * Lazy-load database: <name>.rdx is a gzip-compressed serialized list (variables, references,
//    compressed); variables maps each object to an int pair (offset, length) into <name>.rdb,
//    where an entry is a big-endian uint32 uncompressed length followed by a zlib stream.
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "ropekit/file.h"
#include "ropekit/study.h"

namespace ropekit::study {
namespace {

namespace fs = std::filesystem;

// A parsed R object: only what character vectors and the lazy-load index need.
struct RValue {
  int type = 0;
  std::vector<std::string> strings;  // STRSXP; CHARSXP / SYMSXP: strings[0]
  std::vector<int64_t> ints;         // INTSXP, LGLSXP
  std::vector<RValue> items;         // VECSXP, EXPRSXP; pairlist: the cars
  std::vector<std::string> tags;     // pairlist tags (parallel to items)
  std::vector<std::pair<std::string, RValue>> attributes;

  const RValue* Attribute(std::string_view name) const {
    for (const auto& [n, v] : attributes) {
      if (n == name) return &v;
    }
    return nullptr;
  }
};

constexpr int kSymSxp = 1, kListSxp = 2, kCharSxp = 9, kLglSxp = 10, kIntSxp = 13, kRealSxp = 14,
              kStrSxp = 16, kVecSxp = 19, kExprSxp = 20, kRefSxp = 255, kNilValueSxp = 254,
              kGlobalEnvSxp = 253, kEmptyEnvSxp = 242, kBaseEnvSxp = 241;

class XdrReader {
 public:
  XdrReader(std::string_view data, const std::string& what) : data_(data), what_(what) {}

  RValue ReadTop() {
    if (data_.size() < 2 || data_.substr(0, 2) != "X\n") {
      throw Error(what_ + ": not an R XDR serialization (expected \"X\\n\")");
    }
    pos_ = 2;
    const int32_t version = Int();
    Int();  // writer version
    Int();  // minimal reader version
    if (version == 3) {
      const int32_t n = Int();
      if (n < 0) throw Error(what_ + ": negative native-encoding length");
      Bytes(n);
    } else if (version != 2) {
      throw Error(what_ + ": R serialization version " + std::to_string(version) +
                  " is not supported (2 or 3)");
    }
    return Item(0);
  }

 private:
  int32_t Int() {
    if (pos_ + 4 > data_.size()) throw Error(what_ + ": truncated R serialization");
    const auto* p = reinterpret_cast<const unsigned char*>(data_.data() + pos_);
    pos_ += 4;
    return static_cast<int32_t>((uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
                                (uint32_t{p[2]} << 8) | uint32_t{p[3]});
  }
  std::string_view Bytes(int64_t n) {
    if (n < 0 || pos_ + static_cast<size_t>(n) > data_.size()) {
      throw Error(what_ + ": truncated R serialization");
    }
    std::string_view s = data_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  int64_t Length() {
    const int32_t n = Int();
    if (n >= 0) return n;
    if (n != -1) throw Error(what_ + ": invalid vector length " + std::to_string(n));
    const int64_t hi = static_cast<uint32_t>(Int()), lo = static_cast<uint32_t>(Int());
    return (hi << 32) | lo;
  }
  void ReadAttributes(RValue& v, int depth) {
    RValue list = Item(depth + 1);
    for (size_t i = 0; i < list.items.size(); ++i) {
      v.attributes.emplace_back(i < list.tags.size() ? list.tags[i] : "", std::move(list.items[i]));
    }
  }

  RValue Item(int depth) {
    if (depth > 200) throw Error(what_ + ": R serialization nested too deeply");
    const int32_t flags = Int();
    const int type = flags & 0xff;
    const bool has_attr = (flags >> 9) & 1, has_tag = (flags >> 10) & 1;
    RValue v;
    v.type = type;
    switch (type) {
      case kNilValueSxp:
      case kGlobalEnvSxp:
      case kEmptyEnvSxp:
      case kBaseEnvSxp:
        return v;
      case kRefSxp: {
        int64_t index = flags >> 8;
        if (index == 0) index = Int();
        if (index < 1 || index > static_cast<int64_t>(refs_.size())) {
          throw Error(what_ + ": R reference " + std::to_string(index) + " out of range");
        }
        return refs_[index - 1];
      }
      case kSymSxp: {
        RValue name = Item(depth + 1);
        v.strings = std::move(name.strings);
        refs_.push_back(v);
        return v;
      }
      case kCharSxp: {
        const int32_t n = Int();
        v.strings.emplace_back(n == -1 ? std::string_view() : Bytes(n));
        return v;
      }
      case kListSxp: {
        // Iterative over the cdr chain: attributes, tag, car, then the next cell.
        RValue list;
        list.type = kListSxp;
        int32_t cell_flags = flags;
        while (true) {
          const bool attr = (cell_flags >> 9) & 1, tag = (cell_flags >> 10) & 1;
          if (attr) Item(depth + 1);
          std::string tag_name;
          if (tag) {
            RValue t = Item(depth + 1);
            if (!t.strings.empty()) tag_name = t.strings[0];
          }
          list.tags.push_back(tag_name);
          list.items.push_back(Item(depth + 1));
          cell_flags = Int();
          if ((cell_flags & 0xff) == kNilValueSxp) break;
          if ((cell_flags & 0xff) != kListSxp) {
            throw Error(what_ + ": pairlist tail of type " + std::to_string(cell_flags & 0xff) +
                        " is not supported");
          }
        }
        return list;
      }
      case kLglSxp:
      case kIntSxp: {
        const int64_t n = Length();
        v.ints.reserve(static_cast<size_t>(std::min<int64_t>(n, 1 << 20)));
        for (int64_t i = 0; i < n; ++i) v.ints.push_back(Int());
        break;
      }
      case kRealSxp: {
        const int64_t n = Length();
        Bytes(n * 8);
        break;
      }
      case kStrSxp: {
        const int64_t n = Length();
        for (int64_t i = 0; i < n; ++i) {
          RValue s = Item(depth + 1);
          if (s.type != kCharSxp) throw Error(what_ + ": character vector element is not a string");
          v.strings.push_back(std::move(s.strings[0]));
        }
        break;
      }
      case kVecSxp:
      case kExprSxp: {
        const int64_t n = Length();
        for (int64_t i = 0; i < n; ++i) v.items.push_back(Item(depth + 1));
        break;
      }
      default:
        throw Error(what_ + ": R object type " + std::to_string(type) + " is not supported");
    }
    if (has_attr) ReadAttributes(v, depth);
    (void)has_tag;
    return v;
  }

  std::string_view data_;
  std::string what_;
  size_t pos_ = 0;
  std::vector<RValue> refs_;
};

std::string ShellQuote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') {
      q += "'\\''";
    } else {
      q += c;
    }
  }
  return q + "'";
}

void RunShell(const std::string& command, const std::string& what) {
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    throw Error(what + " failed (exit status " + std::to_string(rc) + "): " + command);
  }
}

}  // namespace

std::string Inflate(std::string_view compressed, const std::string& what) {
  z_stream zs{};
  // 15 + 32: zlib or gzip header, detected automatically.
  if (inflateInit2(&zs, 15 + 32) != Z_OK) throw Error(what + ": zlib initialisation failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(compressed.data()));
  zs.avail_in = static_cast<uInt>(compressed.size());
  std::string out;
  char buf[1 << 16];
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof(buf);
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) {
      inflateEnd(&zs);
      throw Error(what + ": corrupt compressed data (zlib error " + std::to_string(rc) + ")");
    }
    out.append(buf, sizeof(buf) - zs.avail_out);
    if (rc == Z_OK && zs.avail_in == 0 && zs.avail_out != 0) {
      inflateEnd(&zs);
      throw Error(what + ": truncated compressed data");
    }
  }
  inflateEnd(&zs);
  return out;
}

std::vector<std::string> ParseRCharacterVector(std::string_view serialized,
                                               const std::string& what) {
  XdrReader reader(serialized, what);
  RValue v = reader.ReadTop();
  if (v.type != kStrSxp) {
    throw Error(what + ": R object of type " + std::to_string(v.type) +
                " is not a character vector (16)");
  }
  return std::move(v.strings);
}

std::vector<std::pair<std::string, std::vector<std::string>>> ReadRLazyLoadDb(
    const std::string& rdb_path, const std::string& rdx_path) {
  const std::string rdx = Inflate(ReadFileToString(rdx_path), rdx_path);
  XdrReader index_reader(rdx, rdx_path);
  const RValue index = index_reader.ReadTop();
  const RValue* names = index.Attribute("names");
  if (index.type != kVecSxp || names == nullptr || names->strings.size() != index.items.size()) {
    throw Error(rdx_path + ": not a lazy-load index (a named list expected)");
  }
  const RValue* variables = nullptr;
  for (size_t i = 0; i < index.items.size(); ++i) {
    if (names->strings[i] == "variables") variables = &index.items[i];
    if (names->strings[i] == "compressed") {
      const RValue& c = index.items[i];
      if (c.ints.size() != 1 || c.ints[0] != 1) {
        throw Error(rdx_path +
                    ": only zlib-compressed databases (compressed = TRUE) are supported");
      }
    }
  }
  const RValue* var_names = variables ? variables->Attribute("names") : nullptr;
  if (!variables || !var_names || var_names->strings.size() != variables->items.size()) {
    throw Error(rdx_path + ": the index has no named 'variables' list");
  }
  const std::string rdb = ReadFileToString(rdb_path);
  std::vector<std::pair<std::string, std::vector<std::string>>> out;
  for (size_t i = 0; i < variables->items.size(); ++i) {
    const std::string& name = var_names->strings[i];
    const RValue& loc = variables->items[i];
    if (loc.ints.size() != 2)
      throw Error(rdx_path + ": entry '" + name + "' is not (offset, length)");
    const int64_t offset = loc.ints[0], length = loc.ints[1];
    const std::string what = rdb_path + " object '" + name + "'";
    if (offset < 0 || length < 4 || offset + length > static_cast<int64_t>(rdb.size())) {
      throw Error(what + ": offset " + std::to_string(offset) + " + length " +
                  std::to_string(length) + " is outside the file (" + std::to_string(rdb.size()) +
                  " bytes)");
    }
    const auto* p = reinterpret_cast<const unsigned char*>(rdb.data() + offset);
    const uint32_t expected =
        (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
    const std::string blob = Inflate(std::string_view(rdb).substr(static_cast<size_t>(offset) + 4,
                                                                  static_cast<size_t>(length) - 4),
                                     what);
    if (blob.size() != expected) {
      throw Error(what + ": inflated to " + std::to_string(blob.size()) +
                  " bytes, the header says " + std::to_string(expected));
    }
    XdrReader r(blob, what);
    RValue v = r.ReadTop();
    if (v.type == kStrSxp) out.emplace_back(name, std::move(v.strings));
  }
  return out;
}

const std::vector<std::pair<std::string, std::string>>& AustenNovels() {
  static const std::vector<std::pair<std::string, std::string>> kNovels = {
      {"sensesensibility", "sense_and_sensibility"}, {"prideprejudice", "pride_and_prejudice"},
      {"mansfieldpark", "mansfield_park"},           {"emma", "emma"},
      {"northangerabbey", "northanger_abbey"},       {"persuasion", "persuasion"}};
  return kNovels;
}

std::vector<std::string> FetchAustenCorpus(const std::string& data_dir,
                                           const std::function<void(const std::string&)>& log) {
  const fs::path dir = fs::path(data_dir) / "austen";
  std::vector<std::string> paths;
  bool all = true;
  for (const auto& [object, stem] : AustenNovels()) {
    paths.push_back((dir / (stem + ".txt")).string());
    all = all && fs::is_regular_file(paths.back());
  }
  if (all) return paths;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(dir.string() + ": cannot create the corpus directory (" + ec.message() + ")");
  const fs::path deb_dir = fs::path(data_dir) / "janeaustenr";
  const fs::path rdb = deb_dir / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb";
  const fs::path rdx = deb_dir / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx";
  if (!fs::is_regular_file(rdb) || !fs::is_regular_file(rdx)) {
    auto find_deb = [&]() -> fs::path {
      for (const auto& e : fs::directory_iterator(data_dir)) {
        const std::string f = e.path().filename().string();
        if (f.rfind("r-cran-janeaustenr_", 0) == 0 && e.path().extension() == ".deb") {
          return e.path();
        }
      }
      return {};
    };
    fs::path deb = find_deb();
    if (deb.empty()) {
      if (log) log("corpus: apt-get download r-cran-janeaustenr into " + data_dir);
      RunShell("cd " + ShellQuote(data_dir) + " && apt-get download -q r-cran-janeaustenr >&2",
               "apt-get download r-cran-janeaustenr (or pass --corpus FILE...)");
      deb = find_deb();
      if (deb.empty()) throw Error(data_dir + ": apt-get download left no r-cran-janeaustenr .deb");
    }
    if (log) log("corpus: dpkg-deb -x " + deb.string());
    RunShell("dpkg-deb -x " + ShellQuote(deb.string()) + " " + ShellQuote(deb_dir.string()),
             "dpkg-deb -x");
  }
  const auto objects = ReadRLazyLoadDb(rdb.string(), rdx.string());
  for (size_t i = 0; i < AustenNovels().size(); ++i) {
    const std::string& n = AustenNovels()[i].first;
    auto it =
        std::find_if(objects.begin(), objects.end(), [&](const auto& o) { return o.first == n; });
    if (it == objects.end()) throw Error(rdb.string() + ": no object named '" + n + "'");
    std::string text;
    for (const std::string& line : it->second) {
      text += line;
      text += '\n';
    }
    WriteFileAtomic(paths[i], text);
    if (log) log("corpus: wrote " + paths[i] + " (" + std::to_string(text.size()) + " bytes)");
  }
  return paths;
}

StudyCorpus LoadStudyCorpus(const std::vector<std::string>& paths) {
  if (paths.empty()) throw Error("--corpus: at least one text file is required");
  ByteTokenizer tok;
  StudyCorpus c;
  if (paths.size() == 1) {
    std::vector<int32_t> all = tok.Encode(ReadTextFiles(paths));
    const size_t cut = all.size() - all.size() / 10;
    c.held_out.assign(all.begin() + static_cast<int64_t>(cut), all.end());
    all.resize(cut);
    c.train = std::move(all);
    c.description = "training on the first 90% of " + fs::path(paths[0]).filename().string() +
                    ", held out: its last 10%";
  } else {
    c.train = tok.Encode(ReadTextFiles({paths.begin(), paths.end() - 1}));
    c.held_out = tok.Encode(ReadTextFiles({paths.back()}));
    std::string names;
    for (size_t i = 0; i + 1 < paths.size(); ++i) {
      names += (i ? ", " : "") + fs::path(paths[i]).stem().string();
    }
    c.description =
        "training on " + names + "; held out: " + fs::path(paths.back()).stem().string();
  }
  c.description +=
      " (" + std::to_string(c.train.size()) + " / " + std::to_string(c.held_out.size()) + " bytes)";
  // FNV-1a 64 over every byte of the training text, then of the held-out text (the split sizes
  // are recorded beside it in the fingerprint, so moving the split changes that too).
  uint64_t h = 0xcbf29ce484222325ull;
  for (const auto* part : {&c.train, &c.held_out}) {
    for (const int32_t token : *part) {
      h ^= static_cast<uint8_t>(token);
      h *= 0x100000001b3ull;
    }
  }
  c.content_hash = h;
  return c;
}

}  // namespace ropekit::study
