// ropekit Python module (`ropekit._ropekit`): a thin pybind11 layer over the public C++ API.
//
// Arrays: NumPy arrays (float32, float16, float64) and PyTorch tensors (float32, bfloat16,
// float16, float64) are accepted without linking libtorch: a tensor is read through its Python
// attributes (data_ptr(), stride(), shape, dtype, device). Memory is used in place (zero-copy)
// whenever the last dimension is contiguous; the GIL is released while the kernels run.
//
// Dimension legend: B = batch, T = tokens, H = heads, D = head_dim, R = rotary_dim, N = R / 2.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "position_encoding_module.h"
#include "ropekit/error.h"
#include "ropekit/hf_config.h"
#include "ropekit/kv_cache.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"
#include "rotate_f64.h"

namespace py = pybind11;

namespace ropekit::python {
namespace {

// ---------------------------------------------------------------------------------------------
// Configuration and the per-config cache of cos/sin tables.

// Tables are cached per (numerics, effective sequence length). The effective length is 0 for
// every type whose frequencies do not depend on it, so one table serves all calls.
class TableCache {
 public:
  std::shared_ptr<RopeTable> Get(const RopeParams& params, Numerics numerics, int64_t seq_len_key) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto key = std::make_pair(static_cast<int>(numerics), seq_len_key);
    auto it = tables_.find(key);
    if (it != tables_.end()) return it->second;
    auto table = std::make_shared<RopeTable>(ComputeFrequencies(params, numerics, seq_len_key));
    // Bound the cache: dynamic NTK creates one table per distinct length above
    // max_position_embeddings. Tables in use stay alive through their shared_ptr.
    if (tables_.size() >= kMaxTables) tables_.clear();
    tables_.emplace(key, table);
    return table;
  }

 private:
  static constexpr size_t kMaxTables = 32;
  std::mutex mu_;
  std::map<std::pair<int, int64_t>, std::shared_ptr<RopeTable>> tables_;
};

struct Config {
  RopeParams params;
  Layout layout = Layout::kHalfSplit;
  std::string model_type;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  RopeAxes axes;  // multimodal (M-RoPE) sections; empty: one position axis
  std::shared_ptr<TableCache> cache = std::make_shared<TableCache>();
};

void CheckFinite(double value, const char* field) {
  if (!std::isfinite(value)) {
    throw py::value_error(std::string(field) + " must be finite, got " + std::to_string(value));
  }
}

void CheckFiniteParams(const RopeParams& p) {
  CheckFinite(p.base, "base");
  CheckFinite(p.factor, "factor");
  CheckFinite(p.ntk_alpha, "ntk_alpha");
  CheckFinite(p.beta_fast, "beta_fast");
  CheckFinite(p.beta_slow, "beta_slow");
  CheckFinite(p.mscale, "mscale");
  CheckFinite(p.mscale_all_dim, "mscale_all_dim");
  if (p.attention_factor) CheckFinite(*p.attention_factor, "attention_factor");
  for (double v : p.short_factor) CheckFinite(v, "short_factor");
  for (double v : p.long_factor) CheckFinite(v, "long_factor");
  CheckFinite(p.low_freq_factor, "low_freq_factor");
  CheckFinite(p.high_freq_factor, "high_freq_factor");
}

Numerics NumericsArg(const std::string& name) {
  try {
    return ParseNumerics(name);
  } catch (const Error& e) {
    throw py::value_error("numerics: " + std::string(e.what()));
  }
}

Layout LayoutArg(const std::optional<std::string>& name, const Config& config) {
  if (!name) return config.layout;
  try {
    return ParseLayout(*name);
  } catch (const Error& e) {
    throw py::value_error("layout: " + std::string(e.what()));
  }
}

bool LengthDependent(RopeType type) {
  return type == RopeType::kDynamic || type == RopeType::kLongRope;
}

// The sequence length the frequencies are computed for. Not given: max(positions) + 1, what
// transformers uses for each forward call of the length-dependent types. Normalised so that all
// lengths giving the same frequencies share one cache entry.
int64_t SeqLenKey(const RopeParams& params, std::optional<int64_t> seq_len, int64_t max_position) {
  if (seq_len && *seq_len < 0) {
    throw py::value_error("seq_len must be >= 0 (0 or None: not given), got " +
                          std::to_string(*seq_len));
  }
  if (!LengthDependent(params.type)) return 0;
  const int64_t s = seq_len ? *seq_len : max_position + 1;
  if (params.type == RopeType::kDynamic) {
    return s <= params.max_position_embeddings ? 0 : s;
  }
  const int64_t original = params.original_max_position_embeddings > 0
                               ? params.original_max_position_embeddings
                               : params.max_position_embeddings;
  return s > original ? original + 1 : 0;
}

std::string Repr(const Config& c) {
  const RopeParams& p = c.params;
  std::string s = "RopeConfig(rope_type='" + std::string(RopeTypeName(p.type)) +
                  "', base=" + py::str(py::float_(p.base)).cast<std::string>() +
                  ", head_dim=" + std::to_string(p.head_dim) +
                  ", rotary_dim=" + std::to_string(p.rotary_dim) +
                  ", max_position_embeddings=" + std::to_string(p.max_position_embeddings);
  if (p.factor != 0.0) s += ", factor=" + py::str(py::float_(p.factor)).cast<std::string>();
  if (p.type == RopeType::kNtk) {
    s += ", ntk_alpha=" + py::str(py::float_(p.ntk_alpha)).cast<std::string>();
  }
  if (p.original_max_position_embeddings != 0) {
    s += ", original_max_position_embeddings=" + std::to_string(p.original_max_position_embeddings);
  }
  s += ", layout='" + std::string(LayoutName(c.layout)) + "')";
  return s;
}

// ---------------------------------------------------------------------------------------------
// Thread pools: one pool serves one call at a time (ParallelFor is not reentrant), so calls
// from several Python threads lease distinct pools. Intentionally never destroyed: worker
// threads must not be joined during interpreter shutdown.

class PoolRegistry {
 public:
  static PoolRegistry& Get() {
    static PoolRegistry* registry = new PoolRegistry();
    return *registry;
  }
  std::unique_ptr<ThreadPool> Acquire(size_t num_threads) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& idle = idle_[num_threads];
      if (!idle.empty()) {
        auto pool = std::move(idle.back());
        idle.pop_back();
        return pool;
      }
    }
    return std::make_unique<ThreadPool>(num_threads);
  }
  void Release(std::unique_ptr<ThreadPool> pool) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_[pool->num_threads()].push_back(std::move(pool));
  }

 private:
  std::mutex mu_;
  std::map<size_t, std::vector<std::unique_ptr<ThreadPool>>> idle_;
};

class PoolLease {
 public:
  explicit PoolLease(size_t num_threads) {
    if (num_threads > 1) pool_ = PoolRegistry::Get().Acquire(num_threads);
  }
  ~PoolLease() {
    if (pool_) PoolRegistry::Get().Release(std::move(pool_));
  }
  ThreadPool* get() const { return pool_.get(); }

 private:
  std::unique_ptr<ThreadPool> pool_;
};

size_t HardwareThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

size_t g_default_threads = HardwareThreads();  // guarded by the GIL

// Below this many elements a call runs on the calling thread: waking workers costs more.
constexpr int64_t kMinElementsForThreads = 1 << 15;

size_t ThreadsFor(std::optional<int64_t> num_threads, int64_t num_elements) {
  if (num_threads) {
    if (*num_threads < 1 || *num_threads > static_cast<int64_t>(ropekit::kMaxThreads)) {
      throw py::value_error("num_threads must be in [1, " + std::to_string(ropekit::kMaxThreads) +
                            "] (None: the module default), got " + std::to_string(*num_threads));
    }
    return static_cast<size_t>(*num_threads);
  }
  return num_elements < kMinElementsForThreads ? 1 : g_default_threads;
}

// ---------------------------------------------------------------------------------------------
// Arrays: NumPy arrays and torch tensors, inspected without copying.

enum class Elem { kF32, kBF16, kF16, kF64 };

size_t ElemSize(Elem e) {
  switch (e) {
    case Elem::kF32:
      return 4;
    case Elem::kF64:
      return 8;
    default:
      return 2;
  }
}

const char* ElemName(Elem e) {
  switch (e) {
    case Elem::kF32:
      return "float32";
    case Elem::kBF16:
      return "bfloat16";
    case Elem::kF16:
      return "float16";
    default:
      return "float64";
  }
}

DType ToDType(Elem e) {
  switch (e) {
    case Elem::kBF16:
      return DType::kBF16;
    case Elem::kF16:
      return DType::kF16;
    default:
      return DType::kF32;
  }
}

std::string Str(py::handle obj) { return py::str(obj).cast<std::string>(); }

std::string TypeName(py::handle obj) {
  return py::str(py::type::handle_of(obj).attr("__qualname__")).cast<std::string>();
}

std::string ShapeString(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

py::object TorchModule() {
  py::dict modules = py::module_::import("sys").attr("modules");
  if (!modules.contains("torch")) return py::none();
  return modules["torch"];
}

// torch.Tensor, looked up once torch has been imported by the caller (ropekit never imports
// it). Deliberately leaked: it must outlive interpreter shutdown order.
bool IsTorchTensor(py::handle obj) {
  static PyObject* tensor_type = nullptr;
  if (tensor_type == nullptr) {
    py::object torch = TorchModule();
    if (torch.is_none()) return false;
    tensor_type = py::object(torch.attr("Tensor")).release().ptr();
  }
  const int result = PyObject_IsInstance(obj.ptr(), tensor_type);
  if (result < 0) throw py::error_already_set();
  return result == 1;
}

struct Array {
  py::object obj;  // keeps the memory alive
  bool is_torch = false;
  Elem elem = Elem::kF32;
  char* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements
  bool writeable = true;
};

void CheckTorchCpu(py::handle t, const std::string& name) {
  const std::string device_type = py::str(t.attr("device").attr("type")).cast<std::string>();
  if (device_type != "cpu") {
    throw py::value_error(name + " is on device '" + py::str(t.attr("device")).cast<std::string>() +
                          "'; ropekit runs on CPU tensors only (move it with .cpu())");
  }
  const std::string layout = py::str(t.attr("layout")).cast<std::string>();
  if (layout != "torch.strided") {
    throw py::value_error(name + " has layout " + layout +
                          "; only dense (torch.strided) tensors "
                          "are supported");
  }
}

Array InspectFloat(py::handle h, const std::string& name) {
  Array a;
  a.obj = py::reinterpret_borrow<py::object>(h);
  if (IsTorchTensor(h)) {
    a.is_torch = true;
    CheckTorchCpu(h, name);
    const std::string dt = py::str(h.attr("dtype")).cast<std::string>();
    if (dt == "torch.float32") {
      a.elem = Elem::kF32;
    } else if (dt == "torch.bfloat16") {
      a.elem = Elem::kBF16;
    } else if (dt == "torch.float16") {
      a.elem = Elem::kF16;
    } else if (dt == "torch.float64") {
      a.elem = Elem::kF64;
    } else {
      throw py::type_error(name + " has dtype " + dt +
                           "; expected torch.float32, "
                           "torch.bfloat16, torch.float16 or torch.float64");
    }
    a.data = reinterpret_cast<char*>(h.attr("data_ptr")().cast<uintptr_t>());
    for (py::handle d : py::tuple(h.attr("shape"))) a.shape.push_back(d.cast<int64_t>());
    for (py::handle s : py::tuple(h.attr("stride")())) a.strides.push_back(s.cast<int64_t>());
    return a;
  }
  if (!py::isinstance<py::array>(h)) {
    throw py::type_error(name + " must be a numpy.ndarray or a torch.Tensor, got " + TypeName(h));
  }
  auto arr = py::reinterpret_borrow<py::array>(h);
  const py::dtype dt = arr.dtype();
  const std::string dt_name = Str(dt);
  if (dt.kind() != 'f' || (dt.itemsize() != 2 && dt.itemsize() != 4 && dt.itemsize() != 8)) {
    throw py::type_error(name + " has dtype " + dt_name +
                         "; expected float32, float16 or float64 (numpy has no bfloat16: use a "
                         "torch tensor)");
  }
  if (py::str(dt.attr("byteorder")).cast<std::string>() == ">") {
    throw py::type_error(name + " has non-native byte order (" + dt_name + ")");
  }
  if (!py::bool_(arr.attr("flags").attr("aligned"))) {
    throw py::value_error(name + " is not aligned to its element size");
  }
  a.elem = dt.itemsize() == 2 ? Elem::kF16 : dt.itemsize() == 4 ? Elem::kF32 : Elem::kF64;
  a.writeable = arr.writeable();
  a.data = a.writeable ? static_cast<char*>(arr.mutable_data())
                       : const_cast<char*>(static_cast<const char*>(arr.data()));
  const auto itemsize = static_cast<int64_t>(dt.itemsize());
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) {
    a.shape.push_back(arr.shape(i));
    const int64_t st = arr.strides(i);
    if (st % itemsize != 0) {
      throw py::value_error(name + " has a stride of " + std::to_string(st) +
                            " bytes, not a multiple of its element size");
    }
    a.strides.push_back(st / itemsize);
  }
  return a;
}

// A contiguous copy of `a` (same kind, dtype and shape).
Array ContiguousCopy(const Array& a, const std::string& name) {
  py::object copy = a.is_torch ? a.obj.attr("contiguous")()
                               : py::module_::import("numpy").attr("ascontiguousarray")(a.obj);
  return InspectFloat(copy, name);
}

int64_t NumElements(const Array& a);

// A fresh multi-megabyte output is freshly mapped memory: its first touch would take one page
// fault per 4 KiB, which costs more than the rotation itself. Asking for transparent huge pages
// on the 2 MiB-aligned interior (a hint; the kernel may decline) cuts the faults 512-fold.
void AdviseHugePages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// A new contiguous array of the same kind, dtype and shape as `a`.
Array EmptyLike(const Array& a, const std::string& name) {
  py::tuple shape(a.shape.size());
  for (size_t i = 0; i < a.shape.size(); ++i) shape[i] = py::int_(a.shape[i]);
  py::object out;
  if (a.is_torch) {
    out = TorchModule().attr("empty")(shape, py::arg("dtype") = a.obj.attr("dtype"));
  } else {
    out = py::module_::import("numpy").attr("empty")(shape, py::arg("dtype") = a.obj.attr("dtype"));
  }
  Array result = InspectFloat(out, name);
  AdviseHugePages(result.data, static_cast<size_t>(NumElements(result)) * ElemSize(result.elem));
  return result;
}

int64_t NumElements(const Array& a) {
  int64_t n = 1;
  for (int64_t d : a.shape) n *= d;
  return n;
}

// True if distinct indices of `a` address distinct elements (required of anything written).
bool NonOverlapping(const Array& a) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, extent)
  for (size_t i = 0; i < a.shape.size(); ++i) {
    if (a.shape[i] == 0) return true;
    if (a.shape[i] > 1) dims.emplace_back(std::llabs(a.strides[i]), a.shape[i]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;  // elements covered by the dimensions so far
  for (const auto& [stride, extent] : dims) {
    if (stride < span) return false;
    span = stride * (extent - 1) + span;
  }
  return true;
}

// A read can use `a` directly when channels are contiguous and no stride is negative.
bool KernelReadable(const Array& a) {
  if (!a.shape.empty() && a.shape.back() > 1 && a.strides.back() != 1) return false;
  for (size_t i = 0; i < a.shape.size(); ++i) {
    if (a.shape[i] > 1 && a.strides[i] <= 0) return false;
  }
  return true;
}

// [B, T, H, D] interpretation of a 3-D or 4-D array.
struct Batched {
  char* data = nullptr;
  Elem elem = Elem::kF32;
  int64_t B = 1, T = 0, H = 0, D = 0;
  int64_t batch_stride = 0, token_stride = 0, head_stride = 0;  // elements

  TensorView View(int64_t b) const {
    TensorView v;
    v.data = data + b * batch_stride * static_cast<int64_t>(ElemSize(elem));
    v.dtype = ToDType(elem);
    v.num_tokens = T;
    v.num_heads = H;
    v.head_dim = D;
    v.token_stride = token_stride;
    v.head_stride = head_stride;
    return v;
  }
  ViewF64 ViewDouble(int64_t b) const {
    ViewF64 v;
    v.data = reinterpret_cast<double*>(data) + b * batch_stride;
    v.num_tokens = T;
    v.num_heads = H;
    v.head_dim = D;
    v.token_stride = token_stride;
    v.head_stride = head_stride;
    return v;
  }
};

Batched Interpret(const Array& a, bool head_major, const std::string& name) {
  Batched v;
  v.data = a.data;
  v.elem = a.elem;
  const auto& s = a.shape;
  const auto& st = a.strides;
  const char* order = head_major ? "[H, T, D] or [B, H, T, D] (head_major=True)"
                                 : "[T, H, D] or [B, T, H, D] (head_major=False)";
  if (s.size() == 3) {
    v.T = head_major ? s[1] : s[0];
    v.H = head_major ? s[0] : s[1];
    v.token_stride = head_major ? st[1] : st[0];
    v.head_stride = head_major ? st[0] : st[1];
  } else if (s.size() == 4) {
    v.B = s[0];
    v.batch_stride = st[0];
    v.T = head_major ? s[2] : s[1];
    v.H = head_major ? s[1] : s[2];
    v.token_stride = head_major ? st[2] : st[1];
    v.head_stride = head_major ? st[1] : st[2];
  } else {
    throw py::value_error(name + " must be " + order + ", got shape " + ShapeString(s));
  }
  v.D = s.back();
  // Strides of size-1 dimensions are arbitrary (torch reports any value); normalise them so the
  // kernels' overlap checks see a canonical layout.
  if (v.H == 1) v.head_stride = v.D;
  if (v.T == 1) v.token_stride = v.H * v.D;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Positions: 1-D (T,) shared by every batch entry, or 2-D (B, T). num_tokens < 0: any T.

struct Positions {
  py::object owner;
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  int64_t axes = 1;  // A: position axes (M-RoPE); data is [A, rows, T]
  int64_t rows = 1;  // 1 (shared by the batch) or B
  int64_t T = 0;
  int64_t max_position = -1;

  PositionSpan Row(int64_t b, int64_t a = 0) const {
    const int64_t r = (rows == 1 ? 0 : b) + a * rows;
    if (i32) return PositionSpan(std::span<const int32_t>(i32 + r * T, static_cast<size_t>(T)));
    return PositionSpan(std::span<const int64_t>(i64 + r * T, static_cast<size_t>(T)));
  }
  std::vector<PositionSpan> AxisRows(int64_t b) const {
    std::vector<PositionSpan> out;
    for (int64_t a = 0; a < axes; ++a) out.push_back(Row(b, a));
    return out;
  }
};

// An int32/int64 array from a torch tensor (made contiguous), a NumPy array or a sequence.
struct IntArray {
  py::object owner;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t itemsize = 0;
};

IntArray ReadInts(py::handle h, const std::string& name = "positions") {
  IntArray p;
  if (IsTorchTensor(h)) {
    CheckTorchCpu(h, name);
    const std::string dt = Str(h.attr("dtype"));
    if (dt != "torch.int32" && dt != "torch.int64") {
      throw py::type_error(name + " has dtype " + dt + "; expected torch.int32 or torch.int64");
    }
    py::object t = h.attr("contiguous")();
    for (py::handle d : py::tuple(t.attr("shape"))) p.shape.push_back(d.cast<int64_t>());
    p.data = reinterpret_cast<const void*>(t.attr("data_ptr")().cast<uintptr_t>());
    p.itemsize = dt == "torch.int32" ? 4 : 8;
    p.owner = t;
  } else {
    py::module_ np = py::module_::import("numpy");
    py::object arr;
    if (py::isinstance<py::array>(h)) {
      const py::dtype dt = py::reinterpret_borrow<py::array>(h).dtype();
      if (dt.kind() != 'i' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
        throw py::type_error(name + " has dtype " + Str(dt) + "; expected int32 or int64");
      }
      arr = np.attr("ascontiguousarray")(h, py::arg("dtype") = dt.attr("newbyteorder")("="));
    } else if (py::isinstance<py::sequence>(h) && !py::isinstance<py::str>(h)) {
      try {
        arr = np.attr("asarray")(h, py::arg("dtype") = "int64");
      } catch (const py::error_already_set&) {
        throw py::type_error(
            name +
            " must be a sequence of integers, an int32/int64 numpy array or a torch "
            "tensor");
      }
      // Reject floats silently truncated by asarray.
      if (!np.attr("array_equal")(arr, np.attr("asarray")(h)).cast<bool>()) {
        throw py::type_error(name + " must contain integers");
      }
    } else {
      throw py::type_error(name +
                           " must be an int32/int64 numpy array, a torch tensor or a sequence of "
                           "integers, got " +
                           TypeName(h));
    }
    auto a = py::reinterpret_borrow<py::array>(arr);
    for (py::ssize_t i = 0; i < a.ndim(); ++i) p.shape.push_back(a.shape(i));
    p.data = a.data();
    p.itemsize = a.itemsize();
    p.owner = arr;
  }
  return p;
}

Positions InspectPositions(py::handle h, int64_t batch, int64_t num_tokens) {
  Positions p;
  IntArray ints = ReadInts(h);
  p.owner = ints.owner;
  const std::vector<int64_t>& shape = ints.shape;
  const void* data = ints.data;
  const int64_t itemsize = ints.itemsize;
  if (shape.size() == 1) {
    p.rows = 1;
    p.T = shape[0];
  } else if (shape.size() == 2) {
    p.rows = shape[0];
    p.T = shape[1];
    if (p.rows != batch && p.rows != 1) {
      throw py::value_error("positions has shape " + ShapeString(shape) +
                            "; expected (T,) or (B, T) with B = " + std::to_string(batch) +
                            ", T = " + std::to_string(num_tokens));
    }
  } else {
    throw py::value_error("positions must be 1-D (T,) or 2-D (B, T), got " +
                          std::to_string(shape.size()) + " dimensions");
  }
  if (num_tokens >= 0 && p.T != num_tokens) {
    throw py::value_error("positions has " + std::to_string(p.T) +
                          " tokens, expected T = " + std::to_string(num_tokens));
  }
  const int64_t n = p.rows * p.T;
  auto check = [&](int64_t i, int64_t value) {
    if (value < 0 || value > kMaxPosition) {
      throw py::value_error("positions[" + std::to_string(i) + "] = " + std::to_string(value) +
                            " is out of range [0, " + std::to_string(kMaxPosition) + "]");
    }
    p.max_position = std::max(p.max_position, value);
  };
  if (itemsize == 4) {
    p.i32 = static_cast<const int32_t*>(data);
    for (int64_t i = 0; i < n; ++i) check(i, p.i32[i]);
  } else {
    p.i64 = static_cast<const int64_t*>(data);
    for (int64_t i = 0; i < n; ++i) check(i, p.i64[i]);
  }
  return p;
}

// Multimodal positions for a config with A position axes: (A, T) shared by the batch or
// (A, B, T).
Positions InspectAxisPositions(py::handle h, int64_t num_axes, int64_t batch, int64_t num_tokens) {
  Positions p;
  IntArray ints = ReadInts(h);
  p.owner = ints.owner;
  const std::vector<int64_t>& shape = ints.shape;
  const std::string want = "(" + std::to_string(num_axes) + ", T) or (" + std::to_string(num_axes) +
                           ", B, T) with B = " + std::to_string(batch) +
                           ", T = " + std::to_string(num_tokens);
  if ((shape.size() != 2 && shape.size() != 3) || shape[0] != num_axes) {
    throw py::value_error("positions has shape " + ShapeString(shape) +
                          " but the config rotates with " + std::to_string(num_axes) +
                          " position axes (M-RoPE); expected " + want);
  }
  p.axes = num_axes;
  p.rows = shape.size() == 3 ? shape[1] : 1;
  p.T = shape.back();
  if ((p.rows != batch && p.rows != 1) || p.T != num_tokens) {
    throw py::value_error("positions has shape " + ShapeString(shape) + "; expected " + want);
  }
  const int64_t n = p.axes * p.rows * p.T;
  auto check = [&](int64_t i, int64_t value) {
    if (value < 0 || value > kMaxPosition) {
      throw py::value_error("positions (flat index " + std::to_string(i) +
                            ") = " + std::to_string(value) + " is out of range [0, " +
                            std::to_string(kMaxPosition) + "]");
    }
    p.max_position = std::max(p.max_position, value);
  };
  if (ints.itemsize == 4) {
    p.i32 = static_cast<const int32_t*>(ints.data);
    for (int64_t i = 0; i < n; ++i) check(i, p.i32[i]);
  } else {
    p.i64 = static_cast<const int64_t*>(ints.data);
    for (int64_t i = 0; i < n; ++i) check(i, p.i64[i]);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Rotation.

struct ApplyOptions {
  std::optional<std::string> layout;
  std::string numerics = "exact";
  bool inplace = false;
  bool backward = false;
  std::optional<int64_t> seq_len;
  std::optional<int64_t> num_threads;
  bool head_major = false;
};

// Byte intervals [begin, end) of every head row (D channels) of a view, sorted.
std::vector<std::pair<uintptr_t, uintptr_t>> HeadRows(const Batched& v) {
  std::vector<std::pair<uintptr_t, uintptr_t>> rows;
  const auto size = static_cast<int64_t>(ElemSize(v.elem));
  for (int64_t b = 0; b < v.B; ++b) {
    for (int64_t t = 0; t < v.T; ++t) {
      for (int64_t h = 0; h < v.H; ++h) {
        const auto begin = reinterpret_cast<uintptr_t>(
            v.data + (b * v.batch_stride + t * v.token_stride + h * v.head_stride) * size);
        rows.emplace_back(begin, begin + static_cast<uintptr_t>(v.D * size));
      }
    }
  }
  std::sort(rows.begin(), rows.end());
  return rows;
}

bool RowsOverlap(const std::vector<std::pair<uintptr_t, uintptr_t>>& a,
                 const std::vector<std::pair<uintptr_t, uintptr_t>>& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i].second <= b[j].first) {
      ++i;
    } else if (b[j].second <= a[i].first) {
      ++j;
    } else {
      return true;
    }
  }
  return false;
}

// The float64 path does not go through ApplyRope's view checks: outputs must not overlap each
// other, nor (out of place) any input. Small inputs only (gradcheck), so an exact check is cheap.
void CheckNoOverlapF64(const std::vector<Batched>& ins, const std::vector<Batched>& outs,
                       bool inplace, const std::vector<std::pair<py::object, std::string>>& xs) {
  std::vector<std::vector<std::pair<uintptr_t, uintptr_t>>> out_rows;
  for (const auto& o : outs) out_rows.push_back(HeadRows(o));
  for (size_t i = 0; i < outs.size(); ++i) {
    for (size_t k = 1; k < out_rows[i].size(); ++k) {
      if (out_rows[i][k].first < out_rows[i][k - 1].second) {
        throw py::value_error(xs[i].second + ": the output's head rows overlap each other");
      }
    }
    for (size_t j = 0; j < i; ++j) {
      if (RowsOverlap(out_rows[i], out_rows[j])) {
        throw py::value_error(xs[i].second + " and " + xs[j].second + " overlap in memory");
      }
    }
    if (!inplace) {
      for (size_t j = 0; j < ins.size(); ++j) {
        if (RowsOverlap(out_rows[i], HeadRows(ins[j]))) {
          throw py::value_error("the output for " + xs[i].second + " overlaps input " +
                                xs[j].second);
        }
      }
    }
  }
}

void CheckNoGradRecording(const Array& a, const std::string& name) {
  if (!a.is_torch) return;
  if (!a.obj.attr("requires_grad").cast<bool>()) return;
  if (!TorchModule().attr("is_grad_enabled")().cast<bool>()) return;
  throw py::value_error(name +
                        " requires grad, but ropekit.apply_rope does not record autograd "
                        "history; use ropekit.torch.apply_rope / RotaryEmbedding, or call it "
                        "under torch.no_grad()");
}

// Rotates the tensors `xs` (q, k, ...) by the same positions. Returns the outputs (the inputs
// themselves when in place).
std::vector<py::object> Rotate(const std::vector<std::pair<py::object, std::string>>& xs,
                               py::handle positions, const Config& config, const ApplyOptions& opt,
                               py::handle out_arg) {
  const Layout layout = LayoutArg(opt.layout, config);
  const Numerics numerics = NumericsArg(opt.numerics);
  const Direction direction = opt.backward ? Direction::kBackward : Direction::kForward;

  std::vector<Array> ins;
  std::vector<Array> outs;
  for (const auto& [obj, name] : xs) {
    Array in = InspectFloat(obj, name);
    CheckNoGradRecording(in, name);
    if (!ins.empty()) {
      if (in.is_torch != ins[0].is_torch) {
        throw py::type_error(name + " is a " + TypeName(obj) + " but " + xs[0].second + " is a " +
                             TypeName(xs[0].first) + "; pass both as numpy or both as torch");
      }
      if (in.elem != ins[0].elem) {
        throw py::type_error(name + " has dtype " + ElemName(in.elem) + " but " + xs[0].second +
                             " has " + ElemName(ins[0].elem) + "; they must match");
      }
    }
    if (in.shape.size() != 3 && in.shape.size() != 4) Interpret(in, opt.head_major, name);
    Array out;
    if (opt.inplace) {
      if (!out_arg.is_none()) throw py::value_error("out must be None when inplace=True");
      if (!in.writeable) throw py::value_error(name + " is read-only; cannot rotate in place");
      if (!in.shape.empty() && in.shape.back() > 1 && in.strides.back() != 1) {
        throw py::value_error(name +
                              ": in-place rotation needs the last dimension contiguous "
                              "(stride 1), got stride " +
                              std::to_string(in.strides.back()) +
                              "; use inplace=False (the input is then copied)");
      }
      if (!NonOverlapping(in) || !KernelReadable(in)) {
        throw py::value_error(name + " has overlapping or negative strides " +
                              ShapeString(in.strides) + "; cannot rotate in place");
      }
      out = in;
    } else {
      if (!KernelReadable(in)) in = ContiguousCopy(in, name);
      if (!out_arg.is_none()) {
        out = InspectFloat(out_arg, "out");
        if (out.is_torch != in.is_torch || out.elem != in.elem || out.shape != in.shape) {
          throw py::value_error("out must be a " + TypeName(obj) + " of dtype " +
                                ElemName(in.elem) + " and shape " + ShapeString(in.shape));
        }
        if (!out.writeable) throw py::value_error("out is read-only");
        if (!NonOverlapping(out) || !KernelReadable(out)) {
          throw py::value_error(
              "out must have contiguous channels and non-overlapping, "
              "positive strides, got strides " +
              ShapeString(out.strides));
        }
      } else {
        out = EmptyLike(in, name);
      }
    }
    ins.push_back(std::move(in));
    outs.push_back(std::move(out));
  }

  std::vector<Batched> in_views;
  std::vector<Batched> out_views;
  int64_t elements = 0;
  for (size_t i = 0; i < ins.size(); ++i) {
    in_views.push_back(Interpret(ins[i], opt.head_major, xs[i].second));
    out_views.push_back(Interpret(outs[i], opt.head_major, xs[i].second));
    const Batched& v = in_views.back();
    if (i > 0 && (v.B != in_views[0].B || v.T != in_views[0].T)) {
      throw py::value_error(xs[i].second + " has " + std::to_string(v.B) + " batch(es) of " +
                            std::to_string(v.T) + " tokens but " + xs[0].second + " has " +
                            std::to_string(in_views[0].B) + " of " + std::to_string(in_views[0].T));
    }
    if (v.D < config.params.rotary_dim) {
      throw py::value_error(xs[i].second + " has head_dim " + std::to_string(v.D) +
                            " (last dimension), smaller than the config's rotary_dim " +
                            std::to_string(config.params.rotary_dim));
    }
    elements += NumElements(ins[i]);
  }
  const int64_t B = in_views[0].B;
  const int64_t T = in_views[0].T;
  const bool multimodal = config.axes.multimodal();
  const Positions pos = multimodal ? InspectAxisPositions(positions, config.axes.num_axes(), B, T)
                                   : InspectPositions(positions, B, T);
  const int64_t key = SeqLenKey(config.params, opt.seq_len, pos.max_position);
  const size_t threads = ThreadsFor(opt.num_threads, elements);
  const std::shared_ptr<RopeTable> table = config.cache->Get(config.params, numerics, key);
  const bool f64 = ins[0].elem == Elem::kF64;

  // ApplyRope grows the table to cover the positions (up to its memory budget) by itself.
  if (f64 && multimodal) {
    throw py::type_error(
        "float64 inputs take one-axis positions only; rotate multimodal (M-RoPE) "
        "positions in float32, bfloat16 or float16");
  }
  if (f64) CheckNoOverlapF64(in_views, out_views, opt.inplace, xs);
  if (elements > 0) {
    try {
      py::gil_scoped_release release;
      if (f64) {
        for (size_t i = 0; i < in_views.size(); ++i) {
          for (int64_t b = 0; b < B; ++b) {
            RotateF64(*table, pos.Row(b), in_views[i].ViewDouble(b), out_views[i].ViewDouble(b),
                      layout, direction);
          }
        }
      } else {
        PoolLease lease(threads);
        RotateOptions options;
        options.layout = layout;
        options.direction = direction;
        options.pool = lease.get();
        std::vector<RopeOperand> ops(in_views.size());
        for (int64_t b = 0; b < B; ++b) {
          for (size_t i = 0; i < in_views.size(); ++i) {
            ops[i].in = in_views[i].View(b);
            ops[i].out = opt.inplace ? ops[i].in : out_views[i].View(b);
          }
          if (multimodal) {
            const std::vector<PositionSpan> axes = pos.AxisRows(b);
            ApplyRope(*table, AxisPositions{axes}, config.axes, ops, options);
          } else {
            ApplyRope(*table, pos.Row(b), ops, options);
          }
        }
      }
    } catch (const Error& e) {
      std::string names;
      for (size_t i = 0; i < xs.size(); ++i) {
        names += (i ? ", " : "") + std::to_string(i) + " = " + xs[i].second;
      }
      throw py::value_error(std::string(e.what()) + " (operand " + names + ")");
    }
  }
  // Writes through data_ptr() bypass autograd's version counter; bump it with an empty in-place
  // op on a view (views share the counter) so that autograd still detects the modification of a
  // tensor saved for backward, as it would for a torch in-place op.
  if (opt.inplace || !out_arg.is_none()) {
    for (auto& o : outs) {
      if (o.is_torch) o.obj.attr("narrow")(-1, 0, 0).attr("zero_")();
    }
  }
  std::vector<py::object> result;
  for (auto& o : outs) result.push_back(o.obj);
  return result;
}

// ---------------------------------------------------------------------------------------------
// KV cache: fused rotate-and-append and context shift. The binding converts arguments; the
// library checks shapes, slots and overlaps (ropekit::Error becomes ValueError).

// A KV cache array: (S, Hkv, D) contiguous or (pages, P, Hkv, D) paged, C-contiguous, writeable.
KvCacheView CacheArg(const Array& a, const std::string& name) {
  if (a.shape.size() != 3 && a.shape.size() != 4) {
    throw py::value_error(name + " must be (S, Hkv, D) or paged (pages, page_size, Hkv, D), got " +
                          "shape " + ShapeString(a.shape));
  }
  int64_t expect = 1;
  for (size_t i = a.shape.size(); i-- > 0;) {
    if (a.shape[i] > 1 && a.strides[i] != expect) {
      throw py::value_error(name + " must be C-contiguous, got strides " + ShapeString(a.strides));
    }
    expect *= a.shape[i];
  }
  if (!a.writeable) throw py::value_error(name + " is read-only");
  if (a.elem == Elem::kF64) throw py::type_error(name + ": float64 caches are not supported");
  const bool paged = a.shape.size() == 4;
  const int64_t pages = paged ? a.shape[0] : 1;
  const int64_t page = paged ? a.shape[1] : a.shape[0];
  KvCacheView c = PagedKvCache(a.data, nullptr, ToDType(a.elem), pages, page,
                               a.shape[a.shape.size() - 2], a.shape.back());
  if (!paged)
    c = ContiguousKvCache(a.data, nullptr, ToDType(a.elem), page, c.num_heads, c.head_dim);
  return c;
}

// A [T, H, D] tensor argument with contiguous channels (q must also be writeable).
TensorView TokenArg(const Array& a, const std::string& name, bool write) {
  if (a.shape.size() != 3) {
    throw py::value_error(name + " must be (T, H, D), got shape " + ShapeString(a.shape));
  }
  if (!KernelReadable(a) || !NonOverlapping(a)) {
    throw py::value_error(name + " needs contiguous channels and non-overlapping, positive " +
                          "strides, got strides " + ShapeString(a.strides));
  }
  if (write && !a.writeable) throw py::value_error(name + " is read-only; it is rotated in place");
  if (a.elem == Elem::kF64) throw py::type_error(name + ": float64 is not supported here");
  Batched b = Interpret(a, false, name);
  return b.View(0);
}

std::vector<int64_t> SlotsArg(py::handle h, int64_t count) {
  IntArray ints = ReadInts(h, "slots");
  if (ints.shape.size() != 1 || (count >= 0 && ints.shape[0] != count)) {
    throw py::value_error("slots has shape " + ShapeString(ints.shape) + "; expected (" +
                          (count >= 0 ? std::to_string(count) : std::string("n")) + ",)");
  }
  std::vector<int64_t> out(static_cast<size_t>(ints.shape[0]));
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = ints.itemsize == 4 ? static_cast<const int32_t*>(ints.data)[i]
                                : static_cast<const int64_t*>(ints.data)[i];
  }
  return out;
}

void SameFamily(const std::vector<std::pair<const Array*, std::string>>& arrays) {
  for (const auto& [a, name] : arrays) {
    if (a->is_torch != arrays[0].first->is_torch || a->elem != arrays[0].first->elem) {
      throw py::type_error(name + " is a " + TypeName(a->obj) + " of dtype " + ElemName(a->elem) +
                           " but " + arrays[0].second + " is a " + TypeName(arrays[0].first->obj) +
                           " of dtype " + ElemName(arrays[0].first->elem) + "; they must match");
    }
  }
}

void BumpVersion(const Array& a) {
  if (a.is_torch) a.obj.attr("narrow")(-1, 0, 0).attr("zero_")();
}

py::object RopeAndAppend(py::object q, py::object k, py::object v, py::handle positions,
                         py::object cache_k, py::object cache_v, py::handle slots,
                         const Config& config, std::optional<std::string> layout,
                         const std::string& numerics, std::optional<int64_t> num_threads) {
  const Array qa = InspectFloat(q, "q"), ka = InspectFloat(k, "k"), va = InspectFloat(v, "v");
  const Array cka = InspectFloat(cache_k, "cache_k"), cva = InspectFloat(cache_v, "cache_v");
  SameFamily({{&qa, "q"}, {&ka, "k"}, {&va, "v"}, {&cka, "cache_k"}, {&cva, "cache_v"}});
  for (const auto& [a, name] : {std::pair{&qa, "q"}, {&ka, "k"}, {&va, "v"}}) {
    CheckNoGradRecording(*a, name);
  }
  if (config.axes.multimodal()) {
    throw py::value_error(
        "apply_rope_and_append takes one-axis positions; this config rotates "
        "with " +
        std::to_string(config.axes.num_axes()) + " position axes (M-RoPE)");
  }
  const TensorView qv = TokenArg(qa, "q", true);
  const TensorView kv = TokenArg(ka, "k", false), vv = TokenArg(va, "v", false);
  KvCacheView cache = CacheArg(cka, "cache_k");
  const KvCacheView cache_v_view = CacheArg(cva, "cache_v");
  if (cka.shape != cva.shape) {
    throw py::value_error("cache_v has shape " + ShapeString(cva.shape) +
                          " but cache_k has shape " + ShapeString(cka.shape));
  }
  cache.v = cache_v_view.k;
  const Positions pos = InspectPositions(positions, 1, qv.num_tokens);
  if (pos.rows != 1) throw py::value_error("positions must be 1-D (T,)");
  const std::vector<int64_t> slot_list = SlotsArg(slots, qv.num_tokens);
  const int64_t key = SeqLenKey(config.params, std::nullopt, pos.max_position);
  const std::shared_ptr<RopeTable> table =
      config.cache->Get(config.params, NumericsArg(numerics), key);
  RotateOptions options;
  options.layout = LayoutArg(layout, config);
  {
    py::gil_scoped_release release;
    PoolLease lease(ThreadsFor(num_threads, NumElements(qa) + 2 * NumElements(ka)));
    options.pool = lease.get();
    ApplyRopeAndAppend(*table, pos.Row(0), RopeOperand{qv, qv}, kv, vv, cache, slot_list, options);
  }
  BumpVersion(qa);
  BumpVersion(cka);
  BumpVersion(cva);
  return q;
}

py::object ShiftCachedKeys(py::object cache_k, int64_t delta, const Config& config,
                           py::object slots, std::optional<std::string> layout,
                           const std::string& numerics, std::optional<int64_t> seq_len,
                           std::optional<int64_t> num_threads) {
  const Array a = InspectFloat(cache_k, "cache_k");
  CheckNoGradRecording(a, "cache_k");
  if (config.axes.multimodal()) {
    throw py::value_error(
        "shift_keys: a context shift moves one-axis positions; M-RoPE caches "
        "(multimodal positions) cannot be shifted by one delta");
  }
  const KvCacheView cache = CacheArg(a, "cache_k");
  std::vector<int64_t> slot_list;
  if (slots.is_none()) {
    slot_list.resize(static_cast<size_t>(cache.num_slots));
    for (int64_t s = 0; s < cache.num_slots; ++s) slot_list[s] = s;
  } else {
    slot_list = SlotsArg(slots, -1);
  }
  const int64_t key = SeqLenKey(config.params, seq_len, 0);
  const std::shared_ptr<RopeTable> table =
      config.cache->Get(config.params, NumericsArg(numerics), key);
  RotateOptions options;
  options.layout = LayoutArg(layout, config);
  {
    py::gil_scoped_release release;
    PoolLease lease(ThreadsFor(num_threads, NumElements(a)));
    options.pool = lease.get();
    ShiftKeys(*table, cache, slot_list, delta, options);
  }
  BumpVersion(a);
  return cache_k;
}

py::array_t<double> ToNumpy(const std::vector<double>& v) {
  py::array_t<double> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

Config FromHf(const HfRopeConfig& hf) {
  Config c;
  c.params = hf.params;
  c.layout = hf.layout;
  c.model_type = hf.model_type;
  c.num_attention_heads = hf.num_attention_heads;
  c.num_key_value_heads = hf.num_key_value_heads;
  c.axes = hf.axes;
  return c;
}

// Parse errors other than ropekit::Error (e.g. from the JSON library) become ValueError too.
template <typename Fn>
Config ParseOrValueError(Fn&& parse, const std::string& what) {
  try {
    return FromHf(parse());
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw py::value_error(what + ": " + e.what());
  }
}

Config FromHfConfig(py::handle source, std::optional<std::string> layer_type) {
  const std::string lt = layer_type.value_or("");
  py::object obj = py::reinterpret_borrow<py::object>(source);
  // transformers.PretrainedConfig and similar objects.
  if (!py::isinstance<py::dict>(obj) && py::hasattr(obj, "to_dict") &&
      !py::isinstance<py::str>(obj)) {
    obj = obj.attr("to_dict")();
  }
  if (py::isinstance<py::dict>(obj)) {
    std::string text;
    try {
      text = py::module_::import("json")
                 .attr("dumps")(obj, py::arg("allow_nan") = false)
                 .cast<std::string>();
    } catch (const py::error_already_set& e) {
      if (e.matches(PyExc_ValueError)) {
        throw py::value_error("config dict contains a non-finite number (NaN or infinity): " +
                              std::string(e.what()));
      }
      throw py::type_error("config dict is not JSON-serialisable: " + std::string(e.what()));
    }
    return ParseOrValueError([&] { return ParseHfConfig(text, lt); }, "config dict");
  }
  py::object os = py::module_::import("os");
  if (py::isinstance<py::str>(obj) || py::isinstance(obj, os.attr("PathLike"))) {
    const std::string path = py::str(os.attr("fspath")(obj)).cast<std::string>();
    return ParseOrValueError([&] { return LoadHfConfig(path, lt); }, path);
  }
  throw py::type_error(
      "from_hf_config expects a dict, a path (str / os.PathLike) or an object "
      "with to_dict(), got " +
      TypeName(source));
}

}  // namespace
}  // namespace ropekit::python

PYBIND11_MODULE(_ropekit, m) {
  using namespace ropekit;          // NOLINT
  using namespace ropekit::python;  // NOLINT
  m.doc() = "ropekit: rotary position embeddings (C++ core, see the ropekit package docstring)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ropekit::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  py::class_<Config>(m, "RopeConfig", R"doc(
RoPE parameters (field names follow the Hugging Face config keys) plus the channel layout.

Immutable; build one with RopeConfig(head_dim=..., ...) or RopeConfig.from_hf_config(...).
Each config caches its cos/sin tables per (numerics, sequence length), so reuse the object.
)doc")
      .def(py::init([](const std::string& rope_type, double base, int64_t head_dim,
                       std::optional<int64_t> rotary_dim,
                       std::optional<double> partial_rotary_factor, int64_t max_position_embeddings,
                       std::optional<double> factor, double ntk_alpha,
                       std::optional<int64_t> original_max_position_embeddings, double beta_fast,
                       double beta_slow, double mscale, double mscale_all_dim, bool truncate,
                       std::optional<double> attention_factor,
                       std::optional<std::vector<double>> short_factor,
                       std::optional<std::vector<double>> long_factor, double low_freq_factor,
                       double high_freq_factor, const std::string& layout,
                       std::optional<std::vector<int>> mrope_section, bool mrope_interleaved) {
             Config c;
             RopeParams& p = c.params;
             try {
               p.type = ParseRopeType(rope_type);
             } catch (const Error& e) {
               throw py::value_error("rope_type: " + std::string(e.what()));
             }
             if (head_dim < 2 || head_dim > (int64_t{1} << 20)) {
               throw py::value_error("head_dim must be in [2, 1048576], got " +
                                     std::to_string(head_dim));
             }
             p.head_dim = static_cast<int>(head_dim);
             if (rotary_dim && partial_rotary_factor) {
               throw py::value_error("give rotary_dim or partial_rotary_factor, not both");
             }
             if (partial_rotary_factor) {
               CheckFinite(*partial_rotary_factor, "partial_rotary_factor");
               if (*partial_rotary_factor <= 0.0 || *partial_rotary_factor > 1.0) {
                 throw py::value_error("partial_rotary_factor must be in (0, 1], got " +
                                       std::to_string(*partial_rotary_factor));
               }
               // transformers: int(head_dim * partial_rotary_factor), a double product truncated.
               p.rotary_dim =
                   static_cast<int>(static_cast<double>(head_dim) * *partial_rotary_factor);
             } else if (rotary_dim) {
               if (*rotary_dim < 0 || *rotary_dim > head_dim) {
                 throw py::value_error(
                     "rotary_dim must be in [2, head_dim = " + std::to_string(head_dim) +
                     "], got " + std::to_string(*rotary_dim));
               }
               p.rotary_dim = static_cast<int>(*rotary_dim);
             } else {
               p.rotary_dim = p.head_dim;
             }
             p.base = base;
             p.max_position_embeddings = max_position_embeddings;
             p.factor = factor.value_or(0.0);
             p.ntk_alpha = ntk_alpha;
             p.original_max_position_embeddings = original_max_position_embeddings.value_or(0);
             p.beta_fast = beta_fast;
             p.beta_slow = beta_slow;
             p.mscale = mscale;
             p.mscale_all_dim = mscale_all_dim;
             p.truncate = truncate;
             p.attention_factor = attention_factor;
             if (short_factor) p.short_factor = *short_factor;
             if (long_factor) p.long_factor = *long_factor;
             p.low_freq_factor = low_freq_factor;
             p.high_freq_factor = high_freq_factor;
             CheckFiniteParams(p);
             p.Validate();
             try {
               c.layout = ParseLayout(layout);
             } catch (const Error& e) {
               throw py::value_error("layout: " + std::string(e.what()));
             }
             if (mrope_section) c.axes.sections = *mrope_section;
             c.axes.interleaved = mrope_interleaved;
             if (mrope_interleaved && !mrope_section) {
               throw py::value_error("mrope_interleaved=True needs mrope_section");
             }
             try {
               c.axes.PairAxes(p.rotary_dim / 2);
             } catch (const Error& e) {
               throw py::value_error("mrope_section: " + std::string(e.what()));
             }
             return c;
           }),
           py::kw_only(), py::arg("rope_type") = "default", py::arg("base") = 10000.0,
           py::arg("head_dim"), py::arg("rotary_dim") = py::none(),
           py::arg("partial_rotary_factor") = py::none(), py::arg("max_position_embeddings") = 2048,
           py::arg("factor") = py::none(), py::arg("ntk_alpha") = 1.0,
           py::arg("original_max_position_embeddings") = py::none(), py::arg("beta_fast") = 32.0,
           py::arg("beta_slow") = 1.0, py::arg("mscale") = 0.0, py::arg("mscale_all_dim") = 0.0,
           py::arg("truncate") = true, py::arg("attention_factor") = py::none(),
           py::arg("short_factor") = py::none(), py::arg("long_factor") = py::none(),
           py::arg("low_freq_factor") = 1.0, py::arg("high_freq_factor") = 4.0,
           py::arg("layout") = "neox", py::arg("mrope_section") = py::none(),
           py::arg("mrope_interleaved") = false,
           "Keyword constructor for every RopeParams field. rotary_dim defaults to head_dim "
           "(or int(head_dim * partial_rotary_factor)); factor=None and "
           "original_max_position_embeddings=None mean 'absent'. Raises ValueError naming the "
           "first invalid field.")
      .def_static("from_hf_config", &FromHfConfig, py::arg("config"),
                  py::arg("layer_type") = py::none(),
                  "Builds a config from a Hugging Face config.json: a dict, a path, or an object "
                  "with to_dict() (transformers.PretrainedConfig). layer_type selects one entry "
                  "of a per-layer-type rope_parameters dict (e.g. 'sliding_attention').")
      .def_property_readonly(
          "rope_type", [](const Config& c) { return std::string(RopeTypeName(c.params.type)); })
      .def_property_readonly("base", [](const Config& c) { return c.params.base; })
      .def_property_readonly("head_dim", [](const Config& c) { return c.params.head_dim; })
      .def_property_readonly("rotary_dim", [](const Config& c) { return c.params.rotary_dim; })
      .def_property_readonly("max_position_embeddings",
                             [](const Config& c) { return c.params.max_position_embeddings; })
      .def_property_readonly("factor", [](const Config& c) { return c.params.factor; })
      .def_property_readonly("ntk_alpha", [](const Config& c) { return c.params.ntk_alpha; })
      .def_property_readonly(
          "original_max_position_embeddings",
          [](const Config& c) { return c.params.original_max_position_embeddings; })
      .def_property_readonly("beta_fast", [](const Config& c) { return c.params.beta_fast; })
      .def_property_readonly("beta_slow", [](const Config& c) { return c.params.beta_slow; })
      .def_property_readonly("mscale", [](const Config& c) { return c.params.mscale; })
      .def_property_readonly("mscale_all_dim",
                             [](const Config& c) { return c.params.mscale_all_dim; })
      .def_property_readonly("truncate", [](const Config& c) { return c.params.truncate; })
      .def_property_readonly("short_factor", [](const Config& c) { return c.params.short_factor; })
      .def_property_readonly("long_factor", [](const Config& c) { return c.params.long_factor; })
      .def_property_readonly("low_freq_factor",
                             [](const Config& c) { return c.params.low_freq_factor; })
      .def_property_readonly("high_freq_factor",
                             [](const Config& c) { return c.params.high_freq_factor; })
      .def_property_readonly("layout",
                             [](const Config& c) { return std::string(LayoutName(c.layout)); })
      .def_property_readonly("model_type", [](const Config& c) { return c.model_type; })
      .def_property_readonly("mrope_section", [](const Config& c) { return c.axes.sections; })
      .def_property_readonly("mrope_interleaved",
                             [](const Config& c) { return c.axes.interleaved; })
      .def_property_readonly("num_attention_heads",
                             [](const Config& c) { return c.num_attention_heads; })
      .def_property_readonly("num_key_value_heads",
                             [](const Config& c) {
                               return c.num_key_value_heads > 0 ? c.num_key_value_heads
                                                                : c.num_attention_heads;
                             })
      .def_property_readonly(
          "attention_factor",
          [](const Config& c) {
            return ComputeFrequencies(c.params, Numerics::kExact, 0).attention_factor;
          },
          "The magnitude factor A multiplying cos and sin (exact numerics, sequence length "
          "not given). See attention_factor_for().")
      .def(
          "attention_factor_for",
          [](const Config& c, std::optional<int64_t> seq_len, const std::string& numerics) {
            const int64_t key = SeqLenKey(c.params, seq_len.value_or(0), -1);
            return ComputeFrequencies(c.params, NumericsArg(numerics), key).attention_factor;
          },
          py::arg("seq_len") = py::none(), py::arg("numerics") = "exact",
          "A for a given current sequence length and numerics ('exact' or 'hf').")
      .def(
          "inv_freq",
          [](const Config& c, std::optional<int64_t> seq_len, const std::string& numerics) {
            const int64_t key = SeqLenKey(c.params, seq_len.value_or(0), -1);
            return ToNumpy(ComputeFrequencies(c.params, NumericsArg(numerics), key).inv_freq);
          },
          py::arg("seq_len") = py::none(), py::arg("numerics") = "exact",
          "Inverse frequencies w_i, i < N = rotary_dim / 2, as a float64 array. seq_len: the "
          "current sequence length for 'dynamic' / 'longrope' (None: not given).")
      .def(
          "cos_sin",
          [](const Config& c, py::handle positions, const std::string& numerics,
             std::optional<int64_t> seq_len) {
            const Positions pos = InspectPositions(positions, 1, -1);
            if (pos.rows != 1) throw py::value_error("positions must be 1-D for cos_sin");
            const int64_t key = SeqLenKey(c.params, seq_len, pos.max_position);
            const auto table = c.cache->Get(c.params, NumericsArg(numerics), key);
            const int64_t n = table->num_pairs();
            py::array_t<float> cos({pos.T, n});
            py::array_t<float> sin({pos.T, n});
            float* cos_data = cos.mutable_data();
            float* sin_data = sin.mutable_data();
            {
              py::gil_scoped_release release;
              const PositionSpan span = pos.Row(0);
              for (int64_t t = 0; t < pos.T; ++t) {
                table->ComputeRow(span[static_cast<size_t>(t)], cos_data + t * n, sin_data + t * n);
              }
            }
            return py::make_tuple(cos, sin);
          },
          py::arg("positions"), py::arg("numerics") = "exact", py::arg("seq_len") = py::none(),
          "(cos, sin): float32 arrays [T, N] for the given positions, attention factor "
          "applied: exactly the values the kernels use. seq_len as in apply_rope.")
      .def("__repr__", &Repr);

  auto rotate_one = [](py::object x, py::handle positions, const Config& config,
                       std::optional<std::string> layout, const std::string& numerics, bool inplace,
                       bool backward, std::optional<int64_t> seq_len,
                       std::optional<int64_t> num_threads, bool head_major, py::object out) {
    ApplyOptions opt{layout, numerics, inplace, backward, seq_len, num_threads, head_major};
    return Rotate({{x, "x"}}, positions, config, opt, out)[0];
  };
  m.def("apply_rope", rotate_one, py::arg("x"), py::arg("positions"), py::arg("config"),
        py::kw_only(), py::arg("layout") = py::none(), py::arg("numerics") = "exact",
        py::arg("inplace") = false, py::arg("backward") = false, py::arg("seq_len") = py::none(),
        py::arg("num_threads") = py::none(), py::arg("head_major") = false,
        py::arg("out") = py::none(), "See the ropekit package docstring.");
  m.def(
      "apply_rope_backward",
      [](py::object grad, py::handle positions, const Config& config,
         std::optional<std::string> layout, const std::string& numerics, bool inplace,
         std::optional<int64_t> seq_len, std::optional<int64_t> num_threads, bool head_major,
         py::object out) {
        ApplyOptions opt{layout, numerics, inplace, true, seq_len, num_threads, head_major};
        return Rotate({{grad, "grad"}}, positions, config, opt, out)[0];
      },
      py::arg("grad"), py::arg("positions"), py::arg("config"), py::kw_only(),
      py::arg("layout") = py::none(), py::arg("numerics") = "exact", py::arg("inplace") = false,
      py::arg("seq_len") = py::none(), py::arg("num_threads") = py::none(),
      py::arg("head_major") = false, py::arg("out") = py::none(),
      "Gradient of apply_rope: rotation by -theta (R(p)^T grad).");
  m.def(
      "apply_rope_qk",
      [](py::object q, py::object k, py::handle positions, const Config& config,
         std::optional<std::string> layout, const std::string& numerics, bool inplace,
         bool backward, std::optional<int64_t> seq_len, std::optional<int64_t> num_threads,
         bool head_major) {
        ApplyOptions opt{layout, numerics, inplace, backward, seq_len, num_threads, head_major};
        auto outs = Rotate({{q, "q"}, {k, "k"}}, positions, config, opt, py::none());
        return py::make_tuple(outs[0], outs[1]);
      },
      py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("config"), py::kw_only(),
      py::arg("layout") = py::none(), py::arg("numerics") = "exact", py::arg("inplace") = false,
      py::arg("backward") = false, py::arg("seq_len") = py::none(),
      py::arg("num_threads") = py::none(), py::arg("head_major") = false,
      "Rotates q [.., H, D] and k [.., Hkv, D] by the same positions in one call.");
  m.def("apply_rope_and_append", &RopeAndAppend, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("positions"), py::arg("cache_k"), py::arg("cache_v"), py::arg("slots"),
        py::arg("config"), py::kw_only(), py::arg("layout") = py::none(),
        py::arg("numerics") = "exact", py::arg("num_threads") = py::none(),
        "Rotates q [T, H, D] in place and k [T, Hkv, D] at `positions`, and writes the rotated "
        "k and v into cache_k / cache_v ((S, Hkv, D) or paged (pages, page_size, Hkv, D)) at "
        "`slots` (T cache rows; negative = padding, skipped) in one pass. Returns q.");
  m.def("shift_keys", &ShiftCachedKeys, py::arg("cache_k"), py::arg("delta"), py::arg("config"),
        py::kw_only(), py::arg("slots") = py::none(), py::arg("layout") = py::none(),
        py::arg("numerics") = "exact", py::arg("seq_len") = py::none(),
        py::arg("num_threads") = py::none(),
        "Context shift: re-rotates the cached keys at `slots` (default: every slot) in place "
        "by `delta` positions (pure rotation, no attention factor). Returns cache_k.");
  m.def(
      "set_num_threads",
      [](int64_t n) {
        if (n < 0 || n > static_cast<int64_t>(ropekit::kMaxThreads)) {
          throw py::value_error("num_threads must be in [0, " +
                                std::to_string(ropekit::kMaxThreads) +
                                "] (0: all hardware threads), got " + std::to_string(n));
        }
        g_default_threads = n == 0 ? HardwareThreads() : static_cast<size_t>(n);
      },
      py::arg("num_threads"), "Default thread count of calls that pass num_threads=None.");
  m.def("get_num_threads", []() { return g_default_threads; });
  m.def("simd_target", &SimdTargetName, "The SIMD target the kernels dispatch to on this CPU.");
  m.attr("MAX_POSITION") = kMaxPosition;
  AddPositionEncodings(m);
}
