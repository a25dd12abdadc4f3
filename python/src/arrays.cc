// ropekit Python module: NumPy arrays and torch tensors as library views (see arrays.h).
//
// Dimension legend: A = position axes, B = batch, T = tokens, H = heads, D = head_dim.
#include "arrays.h"

#include <pybind11/numpy.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ropekit::python {
namespace {

std::string Str(py::handle obj) { return py::str(obj).cast<std::string>(); }

// torch.Tensor, looked up once torch has been imported by the caller. Deliberately leaked: it
// must outlive interpreter shutdown order.
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

void CheckTorchCpu(py::handle t, const std::string& name) {
  if (Str(t.attr("device").attr("type")) != "cpu") {
    throw py::value_error(name + " is on device '" + Str(t.attr("device")) +
                          "'; ropekit runs on CPU tensors only (move it with .cpu())");
  }
  const std::string layout = Str(t.attr("layout"));
  if (layout != "torch.strided") {
    throw py::value_error(name + " has layout " + layout +
                          "; only dense (torch.strided) tensors are supported");
  }
}

Array InspectTorch(py::handle h, const std::string& name) {
  Array a;
  a.obj = py::reinterpret_borrow<py::object>(h);
  a.is_torch = true;
  CheckTorchCpu(h, name);
  const std::string dt = Str(h.attr("dtype"));
  const std::pair<const char*, DType> kinds[] = {{"torch.float32", DType::kF32},
                                                 {"torch.bfloat16", DType::kBF16},
                                                 {"torch.float16", DType::kF16},
                                                 {"torch.float64", DType::kF64}};
  const auto it = std::find_if(std::begin(kinds), std::end(kinds),
                               [&](const auto& kind) { return dt == kind.first; });
  if (it == std::end(kinds)) {
    throw py::type_error(name + " has dtype " + dt +
                         "; expected torch.float32, torch.bfloat16, torch.float16 or "
                         "torch.float64");
  }
  a.dtype = it->second;
  a.data = reinterpret_cast<char*>(h.attr("data_ptr")().cast<uintptr_t>());
  for (py::handle d : py::tuple(h.attr("shape"))) a.shape.push_back(d.cast<int64_t>());
  for (py::handle s : py::tuple(h.attr("stride")())) a.strides.push_back(s.cast<int64_t>());
  return a;
}

Array InspectNumpy(py::handle h, const std::string& name) {
  Array a;
  a.obj = py::reinterpret_borrow<py::object>(h);
  auto arr = py::reinterpret_borrow<py::array>(h);
  const py::dtype dt = arr.dtype();
  const std::string dt_name = Str(dt);
  if (dt.kind() != 'f' || (dt.itemsize() != 2 && dt.itemsize() != 4 && dt.itemsize() != 8)) {
    throw py::type_error(name + " has dtype " + dt_name +
                         "; expected float32, float16 or float64 (numpy has no bfloat16: use a "
                         "torch tensor)");
  }
  if (Str(dt.attr("byteorder")) == ">") {
    throw py::type_error(name + " has non-native byte order (" + dt_name + ")");
  }
  if (!py::bool_(arr.attr("flags").attr("aligned"))) {
    throw py::value_error(name + " is not aligned to its element size");
  }
  a.dtype = dt.itemsize() == 2 ? DType::kF16 : dt.itemsize() == 4 ? DType::kF32 : DType::kF64;
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

// An int32/int64 array from a torch tensor (made contiguous), a NumPy array or a sequence.
struct IntArray {
  py::object owner;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t itemsize = 0;

  int64_t At(int64_t i) const {
    return itemsize == 4 ? static_cast<const int32_t*>(data)[i]
                         : static_cast<const int64_t*>(data)[i];
  }
};

py::object IntsFromPython(py::handle h, const std::string& name) {
  py::module_ np = py::module_::import("numpy");
  if (py::isinstance<py::array>(h)) {
    const py::dtype dt = py::reinterpret_borrow<py::array>(h).dtype();
    if (dt.kind() != 'i' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
      throw py::type_error(name + " has dtype " + Str(dt) + "; expected int32 or int64");
    }
    return np.attr("ascontiguousarray")(h, py::arg("dtype") = dt.attr("newbyteorder")("="));
  }
  if (!py::isinstance<py::sequence>(h) || py::isinstance<py::str>(h)) {
    throw py::type_error(name +
                         " must be an int32/int64 numpy array, a torch tensor or a sequence of "
                         "integers, got " +
                         TypeName(h));
  }
  py::object arr;
  try {
    arr = np.attr("asarray")(h, py::arg("dtype") = "int64");
  } catch (const py::error_already_set&) {
    throw py::type_error(
        name + " must be a sequence of integers, an int32/int64 numpy array or a torch tensor");
  }
  // Reject floats silently truncated by asarray.
  if (!np.attr("array_equal")(arr, np.attr("asarray")(h)).cast<bool>()) {
    throw py::type_error(name + " must contain integers");
  }
  return arr;
}

IntArray ReadInts(py::handle h, const std::string& name) {
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
    return p;
  }
  p.owner = IntsFromPython(h, name);
  auto a = py::reinterpret_borrow<py::array>(p.owner);
  for (py::ssize_t i = 0; i < a.ndim(); ++i) p.shape.push_back(a.shape(i));
  p.data = a.data();
  p.itemsize = a.itemsize();
  return p;
}

// Takes the values of `ints` (n entries) into `p`, checking each is in [0, kMaxPosition].
// Errors name the entry as positions[i] or, for multimodal positions, by its flat index.
void TakePositions(Positions& p, const IntArray& ints, int64_t n, bool flat_index) {
  p.owner = ints.owner;
  if (ints.itemsize == 4) {
    p.i32 = static_cast<const int32_t*>(ints.data);
  } else {
    p.i64 = static_cast<const int64_t*>(ints.data);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t value = ints.At(i);
    if (value < 0 || value > kMaxPosition) {
      const std::string where = flat_index ? "positions (flat index " + std::to_string(i) + ")"
                                           : "positions[" + std::to_string(i) + "]";
      throw py::value_error(where + " = " + std::to_string(value) + " is out of range [0, " +
                            std::to_string(kMaxPosition) + "]");
    }
    p.max_position = std::max(p.max_position, value);
  }
}

}  // namespace

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

int64_t Array::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool Array::KernelReadable() const {
  if (!shape.empty() && shape.back() > 1 && strides.back() != 1) return false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] > 1 && strides[i] <= 0) return false;
  }
  return true;
}

bool Array::KernelWritable() const { return KernelReadable() && ElementsDistinct(shape, strides); }

Array InspectFloat(py::handle h, const std::string& name) {
  if (IsTorchTensor(h)) return InspectTorch(h, name);
  if (!py::isinstance<py::array>(h)) {
    throw py::type_error(name + " must be a numpy.ndarray or a torch.Tensor, got " + TypeName(h));
  }
  return InspectNumpy(h, name);
}

Array ContiguousCopy(const Array& a, const std::string& name) {
  py::object copy = a.is_torch ? a.obj.attr("contiguous")()
                               : py::module_::import("numpy").attr("ascontiguousarray")(a.obj);
  return InspectFloat(copy, name);
}

Array EmptyLike(const Array& a, const std::string& name) {
  py::tuple shape(a.shape.size());
  for (size_t i = 0; i < a.shape.size(); ++i) shape[i] = py::int_(a.shape[i]);
  py::object module = a.is_torch ? TorchModule() : py::module_::import("numpy");
  Array result =
      InspectFloat(module.attr("empty")(shape, py::arg("dtype") = a.obj.attr("dtype")), name);
  AdviseHugePages(result.data, static_cast<size_t>(result.NumElements()) * DTypeSize(a.dtype));
  return result;
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

void BumpVersion(const Array& a) {
  if (a.is_torch) a.obj.attr("narrow")(-1, 0, 0).attr("zero_")();
}

void SameFamily(const std::vector<std::pair<const Array*, std::string>>& arrays) {
  const auto& [first, first_name] = arrays[0];
  for (const auto& [a, name] : arrays) {
    if (a->is_torch != first->is_torch || a->dtype != first->dtype) {
      throw py::type_error(name + " is a " + TypeName(a->obj) + " of dtype " +
                           std::string(DTypeName(a->dtype)) + " but " + first_name + " is a " +
                           TypeName(first->obj) + " of dtype " +
                           std::string(DTypeName(first->dtype)) + "; they must match");
    }
  }
}

TensorView Batched::View(int64_t b) const {
  TensorView v;
  v.data = data + b * batch_stride * static_cast<int64_t>(DTypeSize(dtype));
  v.dtype = dtype;
  v.num_tokens = T;
  v.num_heads = H;
  v.head_dim = D;
  v.token_stride = token_stride;
  v.head_stride = head_stride;
  return v;
}

Batched Interpret(const Array& a, bool head_major, const std::string& name) {
  Batched v;
  v.data = a.data;
  v.dtype = a.dtype;
  const auto& s = a.shape;
  const auto& st = a.strides;
  if (s.size() != 3 && s.size() != 4) {
    const char* order = head_major ? "[H, T, D] or [B, H, T, D] (head_major=True)"
                                   : "[T, H, D] or [B, T, H, D] (head_major=False)";
    throw py::value_error(name + " must be " + order + ", got shape " + ShapeString(s));
  }
  const size_t first = s.size() - 3;  // index of the first of the (T, H) or (H, T) dimensions
  if (s.size() == 4) {
    v.B = s[0];
    v.batch_stride = st[0];
  }
  const size_t t_dim = head_major ? first + 1 : first;
  const size_t h_dim = head_major ? first : first + 1;
  v.T = s[t_dim];
  v.H = s[h_dim];
  v.token_stride = st[t_dim];
  v.head_stride = st[h_dim];
  v.D = s.back();
  // Strides of size-1 dimensions are arbitrary (torch reports any value); normalise them so the
  // library's overlap checks see a canonical layout.
  if (v.H == 1) v.head_stride = v.D;
  if (v.T == 1) v.token_stride = v.H * v.D;
  return v;
}

PositionSpan Positions::Row(int64_t b, int64_t a) const {
  const int64_t r = (rows == 1 ? 0 : b) + a * rows;
  if (i32) return PositionSpan(std::span<const int32_t>(i32 + r * T, static_cast<size_t>(T)));
  return PositionSpan(std::span<const int64_t>(i64 + r * T, static_cast<size_t>(T)));
}

std::vector<PositionSpan> Positions::AxisRows(int64_t b) const {
  std::vector<PositionSpan> out;
  for (int64_t a = 0; a < axes; ++a) out.push_back(Row(b, a));
  return out;
}

Positions InspectPositions(py::handle h, int64_t batch, int64_t num_tokens) {
  Positions p;
  const IntArray ints = ReadInts(h, "positions");
  const std::vector<int64_t>& shape = ints.shape;
  if (shape.size() != 1 && shape.size() != 2) {
    throw py::value_error("positions must be 1-D (T,) or 2-D (B, T), got " +
                          std::to_string(shape.size()) + " dimensions");
  }
  p.rows = shape.size() == 2 ? shape[0] : 1;
  p.T = shape.back();
  if (p.rows != batch && p.rows != 1) {
    throw py::value_error("positions has shape " + ShapeString(shape) +
                          "; expected (T,) or (B, T) with B = " + std::to_string(batch) +
                          ", T = " + std::to_string(num_tokens));
  }
  if (num_tokens >= 0 && p.T != num_tokens) {
    throw py::value_error("positions has " + std::to_string(p.T) +
                          " tokens, expected T = " + std::to_string(num_tokens));
  }
  TakePositions(p, ints, p.rows * p.T, /*flat_index=*/false);
  return p;
}

Positions InspectAxisPositions(py::handle h, int64_t num_axes, int64_t batch, int64_t num_tokens) {
  Positions p;
  const IntArray ints = ReadInts(h, "positions");
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
  TakePositions(p, ints, p.axes * p.rows * p.T, /*flat_index=*/true);
  return p;
}

std::vector<int64_t> ReadSlots(py::handle h, int64_t count) {
  const IntArray ints = ReadInts(h, "slots");
  if (ints.shape.size() != 1 || (count >= 0 && ints.shape[0] != count)) {
    throw py::value_error("slots has shape " + ShapeString(ints.shape) + "; expected (" +
                          (count >= 0 ? std::to_string(count) : std::string("n")) + ",)");
  }
  std::vector<int64_t> out(static_cast<size_t>(ints.shape[0]));
  for (size_t i = 0; i < out.size(); ++i) out[i] = ints.At(static_cast<int64_t>(i));
  return out;
}

}  // namespace ropekit::python
