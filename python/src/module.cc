// ropekit Python module (`ropekit._ropekit`): a thin pybind11 layer over the public C++ API.
//
// Arrays: NumPy arrays (float32, float16, float64) and PyTorch tensors (float32, bfloat16,
// float16, float64) become library views (arrays.h); memory is used in place (zero-copy)
// whenever the last dimension is contiguous; the GIL is released while the library runs. The
// library owns the tables (RopeTableCache), the thread pools (ThreadPoolLease), the argument and
// overlap checks and every rotation, float64 included.
//
// Dimension legend: B = batch, T = tokens, H = heads, D = head_dim, R = rotary_dim, N = R / 2.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "arrays.h"
#include "position_encoding_module.h"
#include "rope_config.h"
#include "ropekit/error.h"
#include "ropekit/kv_cache.h"
#include "ropekit/rope.h"
#include "ropekit/thread_pool.h"

namespace ropekit::python {
namespace {

size_t HardwareThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

size_t g_default_threads = HardwareThreads();  // guarded by the GIL

// Below this many elements a call runs on the calling thread: waking workers costs more.
constexpr int64_t kMinElementsForThreads = 1 << 15;

size_t ThreadsFor(std::optional<int64_t> num_threads, int64_t num_elements) {
  if (num_threads) {
    if (*num_threads < 1 || *num_threads > static_cast<int64_t>(kMaxThreads)) {
      throw py::value_error("num_threads must be in [1, " + std::to_string(kMaxThreads) +
                            "] (None: the module default), got " + std::to_string(*num_threads));
    }
    return static_cast<size_t>(*num_threads);
  }
  return num_elements < kMinElementsForThreads ? 1 : g_default_threads;
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

using Named = std::pair<py::object, std::string>;

// The output array for input `in`: `in` itself (in place), `out_arg`, or a new array. A
// non-contiguous input of an out-of-place call is replaced by a contiguous copy.
Array OutputFor(Array& in, const Named& x, const ApplyOptions& opt, py::handle out_arg) {
  const std::string& name = x.second;
  if (opt.inplace) {
    if (!out_arg.is_none()) throw py::value_error("out must be None when inplace=True");
    if (!in.writeable) throw py::value_error(name + " is read-only; cannot rotate in place");
    if (!in.shape.empty() && in.shape.back() > 1 && in.strides.back() != 1) {
      throw py::value_error(name +
                            ": in-place rotation needs the last dimension contiguous (stride 1), "
                            "got stride " +
                            std::to_string(in.strides.back()) +
                            "; use inplace=False (the input is then copied)");
    }
    if (!in.KernelWritable()) {
      throw py::value_error(name + " has overlapping or negative strides " +
                            ShapeString(in.strides) + "; cannot rotate in place");
    }
    return in;
  }
  if (!in.KernelReadable()) in = ContiguousCopy(in, name);
  if (out_arg.is_none()) return EmptyLike(in, name);
  Array out = InspectFloat(out_arg, "out");
  if (out.is_torch != in.is_torch || out.dtype != in.dtype || out.shape != in.shape) {
    throw py::value_error("out must be a " + TypeName(x.first) + " of dtype " +
                          std::string(DTypeName(in.dtype)) + " and shape " + ShapeString(in.shape));
  }
  if (!out.writeable) throw py::value_error("out is read-only");
  if (!out.KernelWritable()) {
    throw py::value_error(
        "out must have contiguous channels and non-overlapping, positive strides, got strides " +
        ShapeString(out.strides));
  }
  return out;
}

// Inputs and outputs of one call, as arrays and as [B, T, H, D] views.
struct Operands {
  std::vector<Array> ins, outs;
  std::vector<Batched> in_views, out_views;
  int64_t elements = 0;
};

Operands InspectOperands(const std::vector<Named>& xs, const Config& config,
                         const ApplyOptions& opt, py::handle out_arg) {
  Operands o;
  for (const Named& x : xs) {
    Array in = InspectFloat(x.first, x.second);
    CheckNoGradRecording(in, x.second);
    if (!o.ins.empty() && in.is_torch != o.ins[0].is_torch) {
      throw py::type_error(x.second + " is a " + TypeName(x.first) + " but " + xs[0].second +
                           " is a " + TypeName(xs[0].first) +
                           "; pass both as numpy or both as torch");
    }
    if (!o.ins.empty() && in.dtype != o.ins[0].dtype) {
      throw py::type_error(x.second + " has dtype " + std::string(DTypeName(in.dtype)) + " but " +
                           xs[0].second + " has " + std::string(DTypeName(o.ins[0].dtype)) +
                           "; they must match");
    }
    Interpret(in, opt.head_major, x.second);  // shape check before any copy
    Array out = OutputFor(in, x, opt, out_arg);
    o.in_views.push_back(Interpret(in, opt.head_major, x.second));
    o.out_views.push_back(Interpret(out, opt.head_major, x.second));
    o.elements += in.NumElements();
    o.ins.push_back(std::move(in));
    o.outs.push_back(std::move(out));
  }
  for (size_t i = 1; i < xs.size(); ++i) {
    const Batched &v = o.in_views[i], &v0 = o.in_views[0];
    if (v.B != v0.B || v.T != v0.T) {
      throw py::value_error(xs[i].second + " has " + std::to_string(v.B) + " batch(es) of " +
                            std::to_string(v.T) + " tokens but " + xs[0].second + " has " +
                            std::to_string(v0.B) + " of " + std::to_string(v0.T));
    }
  }
  for (size_t i = 0; i < xs.size(); ++i) {
    if (o.in_views[i].D < config.params.rotary_dim) {
      throw py::value_error(xs[i].second + " has head_dim " + std::to_string(o.in_views[i].D) +
                            " (last dimension), smaller than the config's rotary_dim " +
                            std::to_string(config.params.rotary_dim));
    }
  }
  return o;
}

// One ApplyRope call per batch entry. The library grows the table to cover the positions.
void RotateBatches(const RopeTable& table, const Positions& pos, const Config& config,
                   const Operands& o, bool inplace, const RotateOptions& options) {
  std::vector<RopeOperand> ops(o.in_views.size());
  for (int64_t b = 0; b < o.in_views[0].B; ++b) {
    for (size_t i = 0; i < ops.size(); ++i) {
      ops[i].in = o.in_views[i].View(b);
      ops[i].out = inplace ? ops[i].in : o.out_views[i].View(b);
    }
    if (config.axes.multimodal()) {
      const std::vector<PositionSpan> axes = pos.AxisRows(b);
      ApplyRope(table, AxisPositions{axes}, config.axes, ops, options);
    } else {
      ApplyRope(table, pos.Row(b), ops, options);
    }
  }
}

// Rotates the tensors `xs` (q, k, ...) by the same positions. Returns the outputs (the inputs
// themselves when in place).
std::vector<py::object> Rotate(const std::vector<Named>& xs, py::handle positions,
                               const Config& config, const ApplyOptions& opt, py::handle out_arg) {
  RotateOptions options;
  options.layout = config.LayoutOr(opt.layout);
  options.direction = opt.backward ? Direction::kBackward : Direction::kForward;
  const Operands o = InspectOperands(xs, config, opt, out_arg);
  const int64_t B = o.in_views[0].B, T = o.in_views[0].T;
  const bool multimodal = config.axes.multimodal();
  const Positions pos = multimodal ? InspectAxisPositions(positions, config.axes.num_axes(), B, T)
                                   : InspectPositions(positions, B, T);
  const auto table = config.Table(opt.numerics, opt.seq_len, pos.max_position);
  const size_t threads = ThreadsFor(opt.num_threads, o.elements);
  if (o.ins[0].dtype == DType::kF64 && multimodal) {
    throw py::type_error(
        "float64 inputs take one-axis positions only; rotate multimodal (M-RoPE) positions in "
        "float32, bfloat16 or float16");
  }
  if (o.elements > 0) {
    try {
      py::gil_scoped_release release;
      ThreadPoolLease lease(threads);
      options.pool = lease.get();
      RotateBatches(*table, pos, config, o, opt.inplace, options);
    } catch (const Error& e) {
      std::string names;
      for (size_t i = 0; i < xs.size(); ++i) {
        names += (i ? ", " : "") + std::to_string(i) + " = " + xs[i].second;
      }
      throw py::value_error(std::string(e.what()) + " (operand " + names + ")");
    }
  }
  if (opt.inplace || !out_arg.is_none()) {
    for (const Array& out : o.outs) BumpVersion(out);
  }
  std::vector<py::object> result;
  for (const Array& out : o.outs) result.push_back(out.obj);
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
  if (a.dtype == DType::kF64) throw py::type_error(name + ": float64 caches are not supported");
  const int64_t heads = a.shape[a.shape.size() - 2];
  if (a.shape.size() == 4) {
    return PagedKvCache(a.data, nullptr, a.dtype, a.shape[0], a.shape[1], heads, a.shape.back());
  }
  return ContiguousKvCache(a.data, nullptr, a.dtype, a.shape[0], heads, a.shape.back());
}

// A [T, H, D] tensor argument with contiguous channels (q must also be writeable).
TensorView TokenArg(const Array& a, const std::string& name, bool write) {
  if (a.shape.size() != 3) {
    throw py::value_error(name + " must be (T, H, D), got shape " + ShapeString(a.shape));
  }
  if (!a.KernelWritable()) {
    throw py::value_error(name + " needs contiguous channels and non-overlapping, positive " +
                          "strides, got strides " + ShapeString(a.strides));
  }
  if (write && !a.writeable) throw py::value_error(name + " is read-only; it is rotated in place");
  if (a.dtype == DType::kF64) throw py::type_error(name + ": float64 is not supported here");
  return Interpret(a, false, name).View(0);
}

void CheckOneAxis(const Config& config, const std::string& what) {
  if (config.axes.multimodal()) {
    throw py::value_error(what + "; this config rotates with " +
                          std::to_string(config.axes.num_axes()) + " position axes (M-RoPE)");
  }
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
  CheckOneAxis(config, "apply_rope_and_append takes one-axis positions");
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
  const std::vector<int64_t> slot_list = ReadSlots(slots, qv.num_tokens);
  const auto table = config.Table(numerics, std::nullopt, pos.max_position);
  RotateOptions options;
  options.layout = config.LayoutOr(layout);
  {
    py::gil_scoped_release release;
    ThreadPoolLease lease(ThreadsFor(num_threads, qa.NumElements() + 2 * ka.NumElements()));
    options.pool = lease.get();
    ApplyRopeAndAppend(*table, pos.Row(0), RopeOperand{qv, qv}, kv, vv, cache, slot_list, options);
  }
  for (const Array* a : {&qa, &cka, &cva}) BumpVersion(*a);
  return q;
}

py::object ShiftCachedKeys(py::object cache_k, int64_t delta, const Config& config,
                           py::object slots, std::optional<std::string> layout,
                           const std::string& numerics, std::optional<int64_t> seq_len,
                           std::optional<int64_t> num_threads) {
  const Array a = InspectFloat(cache_k, "cache_k");
  CheckNoGradRecording(a, "cache_k");
  CheckOneAxis(config,
               "shift_keys: a context shift moves one-axis positions; M-RoPE caches "
               "(multimodal positions) cannot be shifted by one delta");
  const KvCacheView cache = CacheArg(a, "cache_k");
  std::vector<int64_t> slot_list;
  if (slots.is_none()) {
    slot_list.resize(static_cast<size_t>(cache.num_slots));
    for (int64_t s = 0; s < cache.num_slots; ++s) slot_list[s] = s;
  } else {
    slot_list = ReadSlots(slots, -1);
  }
  const auto table = config.Table(numerics, seq_len, 0);
  RotateOptions options;
  options.layout = config.LayoutOr(layout);
  {
    py::gil_scoped_release release;
    ThreadPoolLease lease(ThreadsFor(num_threads, a.NumElements()));
    options.pool = lease.get();
    ShiftKeys(*table, cache, slot_list, delta, options);
  }
  BumpVersion(a);
  return cache_k;
}

void AddRotations(py::module_& m) {
  m.def(
      "apply_rope",
      [](py::object x, py::handle positions, const Config& config,
         std::optional<std::string> layout, const std::string& numerics, bool inplace,
         bool backward, std::optional<int64_t> seq_len, std::optional<int64_t> num_threads,
         bool head_major, py::object out) {
        ApplyOptions opt{layout, numerics, inplace, backward, seq_len, num_threads, head_major};
        return Rotate({{x, "x"}}, positions, config, opt, out)[0];
      },
      py::arg("x"), py::arg("positions"), py::arg("config"), py::kw_only(),
      py::arg("layout") = py::none(), py::arg("numerics") = "exact", py::arg("inplace") = false,
      py::arg("backward") = false, py::arg("seq_len") = py::none(),
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
  AddRopeConfig(m);
  AddRotations(m);
  m.def(
      "set_num_threads",
      [](int64_t n) {
        if (n < 0 || n > static_cast<int64_t>(kMaxThreads)) {
          throw py::value_error("num_threads must be in [0, " + std::to_string(kMaxThreads) +
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
