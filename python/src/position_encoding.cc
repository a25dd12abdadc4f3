// ropekit Python module: the other position encodings (sinusoidal, ALiBi, T5 relative buckets),
// thin wrappers over ropekit/position_encoding.h returning NumPy arrays.
//
// Dimension legend: H = heads, Tq = query positions, Tk = key positions, d = embedding width.
#include "ropekit/position_encoding.h"

#include <pybind11/numpy.h>

#include <cstdint>
#include <string>
#include <vector>

#include "position_encoding_module.h"
#include "ropekit/error.h"

namespace py = pybind11;

namespace ropekit::python {
namespace {

std::vector<int64_t> ToPositions(py::handle h, const char* name) {
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> a;
  try {
    a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(h);
  } catch (const py::error_already_set&) {
    a = {};
  }
  if (!a || a.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be a 1-D sequence of integer positions");
  }
  const py::array original = py::array::ensure(h);
  if (original && original.dtype().kind() != 'i' && original.dtype().kind() != 'u') {
    throw py::type_error(std::string(name) + " must contain integers");
  }
  std::vector<int64_t> v(a.data(), a.data() + a.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] < 0 || v[i] > kMaxPosition) {
      throw py::value_error(std::string(name) + "[" + std::to_string(i) +
                            "] = " + std::to_string(v[i]) + " is out of range [0, " +
                            std::to_string(kMaxPosition) + "]");
    }
  }
  return v;
}

}  // namespace

void AddPositionEncodings(py::module_& m) {
  m.def(
      "alibi_slopes",
      [](int num_heads) {
        const std::vector<double> s = AlibiSlopes(num_heads);
        py::array_t<double> a(static_cast<py::ssize_t>(s.size()));
        std::copy(s.begin(), s.end(), a.mutable_data());
        return a;
      },
      py::arg("num_heads"), "ALiBi slopes m_0..m_{H-1} (Press et al. 2022), float64 [H].");
  m.def(
      "alibi_bias",
      [](int num_heads, py::handle query_positions, py::handle key_positions) {
        const std::vector<int64_t> q = ToPositions(query_positions, "query_positions");
        const std::vector<int64_t> k = ToPositions(key_positions, "key_positions");
        PositionEncodingSpec spec;
        spec.kind = PositionEncodingKind::kAlibi;
        spec.num_heads = num_heads;
        const PositionEncoding pe(spec);
        const auto tq = static_cast<py::ssize_t>(q.size());
        const auto tk = static_cast<py::ssize_t>(k.size());
        py::array_t<float> out({static_cast<py::ssize_t>(num_heads), tq, tk});
        float* data = out.mutable_data();
        std::fill(data, data + out.size(), 0.0f);
        {
          py::gil_scoped_release release;
          for (int h = 0; h < num_heads; ++h) {
            for (py::ssize_t i = 0; i < tq; ++i) {
              pe.AddLogitBias(q[static_cast<size_t>(i)], PositionSpan(k), h, {},
                              data + (h * tq + i) * tk);
            }
          }
        }
        return out;
      },
      py::arg("num_heads"), py::arg("query_positions"), py::arg("key_positions"),
      "ALiBi logit bias -m_h * (i - j), float32 [H, Tq, Tk] (no causal mask applied).");
  m.def(
      "t5_relative_bucket",
      [](py::handle relative_position, bool bidirectional, int num_buckets, int max_distance) {
        if (py::isinstance<py::int_>(relative_position)) {
          return py::object(py::int_(T5RelativeBucket(relative_position.cast<int64_t>(),
                                                      bidirectional, num_buckets, max_distance)));
        }
        const py::array original = py::array::ensure(relative_position);
        if (!original || (original.dtype().kind() != 'i' && original.dtype().kind() != 'u')) {
          throw py::type_error("relative_position must be an integer or an integer array");
        }
        auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(original);
        py::array_t<int32_t> out(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
        for (py::ssize_t i = 0; i < a.size(); ++i) {
          out.mutable_data()[i] =
              T5RelativeBucket(a.data()[i], bidirectional, num_buckets, max_distance);
        }
        return py::object(out);
      },
      py::arg("relative_position"), py::arg("bidirectional") = false, py::arg("num_buckets") = 32,
      py::arg("max_distance") = 128,
      "T5 relative-position bucket of key_position - query_position (int or int32 array).");
  m.def(
      "sinusoidal_table",
      [](py::handle positions, int dim, double base) {
        const std::vector<int64_t> p = ToPositions(positions, "positions");
        if (dim < 1) throw py::value_error("dim must be >= 1, got " + std::to_string(dim));
        if (!(base > 1.0) || base > 1e300) {
          throw py::value_error("base must be a finite number > 1, got " + std::to_string(base));
        }
        py::array_t<float> out({static_cast<py::ssize_t>(p.size()), static_cast<py::ssize_t>(dim)});
        float* data = out.mutable_data();
        {
          py::gil_scoped_release release;
          for (size_t t = 0; t < p.size(); ++t) SinusoidalRow(p[t], dim, base, data + t * dim);
        }
        return out;
      },
      py::arg("positions"), py::arg("dim"), py::arg("base") = 10000.0,
      "Sinusoidal encodings (Vaswani et al. 2017) for the given positions: float32 [T, dim], "
      "P[k, 2i] = sin(k / base^(2i/dim)), P[k, 2i+1] = cos(...).");
}

}  // namespace ropekit::python
