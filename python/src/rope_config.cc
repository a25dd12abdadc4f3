// ropekit Python module: RopeConfig (see rope_config.h). Keyword arguments become RopeParams
// fields; the library validates them and owns the tables.
//
// Dimension legend: T = tokens, R = rotary_dim, N = R / 2.
#include "rope_config.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "arrays.h"
#include "ropekit/hf_config.h"

namespace ropekit::python {
namespace {

void CheckFinite(double value, const char* field) {
  if (!std::isfinite(value)) {
    throw py::value_error(std::string(field) + " must be finite, got " + std::to_string(value));
  }
}

// Non-finite keyword arguments are named by their Python keyword (the library's messages name
// the config.json keys, e.g. rope_theta for base).
void CheckFiniteParams(const RopeParams& p) {
  const std::pair<double, const char*> scalars[] = {
      {p.base, "base"},
      {p.factor, "factor"},
      {p.ntk_alpha, "ntk_alpha"},
      {p.beta_fast, "beta_fast"},
      {p.beta_slow, "beta_slow"},
      {p.mscale, "mscale"},
      {p.mscale_all_dim, "mscale_all_dim"},
      {p.attention_factor.value_or(1.0), "attention_factor"},
      {p.low_freq_factor, "low_freq_factor"},
      {p.high_freq_factor, "high_freq_factor"}};
  for (const auto& [value, field] : scalars) CheckFinite(value, field);
  for (double v : p.short_factor) CheckFinite(v, "short_factor");
  for (double v : p.long_factor) CheckFinite(v, "long_factor");
}

// Re-raises a library Error as ValueError prefixed with the argument's name.
template <typename Fn>
auto Named(const std::string& what, Fn&& fn) {
  try {
    return fn();
  } catch (const Error& e) {
    throw py::value_error(what + ": " + std::string(e.what()));
  }
}

Numerics NumericsArg(const std::string& name) {
  return Named("numerics", [&] { return ParseNumerics(name); });
}

std::string Num(double v) { return py::str(py::float_(v)).cast<std::string>(); }

std::string Repr(const Config& c) {
  const RopeParams& p = c.params;
  std::string s = "RopeConfig(rope_type='" + std::string(RopeTypeName(p.type)) +
                  "', base=" + Num(p.base) + ", head_dim=" + std::to_string(p.head_dim) +
                  ", rotary_dim=" + std::to_string(p.rotary_dim) +
                  ", max_position_embeddings=" + std::to_string(p.max_position_embeddings);
  if (p.factor != 0.0) s += ", factor=" + Num(p.factor);
  if (p.type == RopeType::kNtk) s += ", ntk_alpha=" + Num(p.ntk_alpha);
  if (p.original_max_position_embeddings != 0) {
    s += ", original_max_position_embeddings=" + std::to_string(p.original_max_position_embeddings);
  }
  return s + ", layout='" + std::string(LayoutName(c.layout)) + "')";
}

Config WithTables(Config c) {
  c.tables = std::make_shared<RopeTableCache>(c.params);
  return c;
}

// rotary_dim from rotary_dim or partial_rotary_factor (transformers: int(head_dim * factor), a
// double product truncated); head_dim when neither is given.
int RotaryDimArg(int64_t head_dim, std::optional<int64_t> rotary_dim,
                 std::optional<double> partial_rotary_factor) {
  if (rotary_dim && partial_rotary_factor) {
    throw py::value_error("give rotary_dim or partial_rotary_factor, not both");
  }
  if (partial_rotary_factor) {
    CheckFinite(*partial_rotary_factor, "partial_rotary_factor");
    if (*partial_rotary_factor <= 0.0 || *partial_rotary_factor > 1.0) {
      throw py::value_error("partial_rotary_factor must be in (0, 1], got " +
                            std::to_string(*partial_rotary_factor));
    }
    return static_cast<int>(static_cast<double>(head_dim) * *partial_rotary_factor);
  }
  if (!rotary_dim) return static_cast<int>(head_dim);
  if (*rotary_dim < 0 || *rotary_dim > head_dim) {
    throw py::value_error("rotary_dim must be in [2, head_dim = " + std::to_string(head_dim) +
                          "], got " + std::to_string(*rotary_dim));
  }
  return static_cast<int>(*rotary_dim);
}

void SetAxes(Config& c, std::optional<std::vector<int>> mrope_section, bool mrope_interleaved) {
  if (mrope_interleaved && !mrope_section) {
    throw py::value_error("mrope_interleaved=True needs mrope_section");
  }
  if (mrope_section) c.axes.sections = *mrope_section;
  c.axes.interleaved = mrope_interleaved;
  Named("mrope_section", [&] { return c.axes.PairAxes(c.params.rotary_dim / 2); });
}

Config MakeConfig(const std::string& rope_type, double base, int64_t head_dim,
                  std::optional<int64_t> rotary_dim, std::optional<double> partial_rotary_factor,
                  int64_t max_position_embeddings, std::optional<double> factor, double ntk_alpha,
                  std::optional<int64_t> original_max_position_embeddings, double beta_fast,
                  double beta_slow, double mscale, double mscale_all_dim, bool truncate,
                  std::optional<double> attention_factor,
                  std::optional<std::vector<double>> short_factor,
                  std::optional<std::vector<double>> long_factor, double low_freq_factor,
                  double high_freq_factor, const std::string& layout,
                  std::optional<std::vector<int>> mrope_section, bool mrope_interleaved) {
  Config c;
  RopeParams& p = c.params;
  p.type = Named("rope_type", [&] { return ParseRopeType(rope_type); });
  if (head_dim < 2 || head_dim > (int64_t{1} << 20)) {
    throw py::value_error("head_dim must be in [2, 1048576], got " + std::to_string(head_dim));
  }
  p.head_dim = static_cast<int>(head_dim);
  p.rotary_dim = RotaryDimArg(head_dim, rotary_dim, partial_rotary_factor);
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
  p.short_factor = short_factor.value_or(std::vector<double>{});
  p.long_factor = long_factor.value_or(std::vector<double>{});
  p.low_freq_factor = low_freq_factor;
  p.high_freq_factor = high_freq_factor;
  CheckFiniteParams(p);
  p.Validate();
  c.layout = Named("layout", [&] { return ParseLayout(layout); });
  SetAxes(c, mrope_section, mrope_interleaved);
  return WithTables(std::move(c));
}

Config FromHf(const HfRopeConfig& hf) {
  Config c;
  c.params = hf.params;
  c.layout = hf.layout;
  c.model_type = hf.model_type;
  c.num_attention_heads = hf.num_attention_heads;
  c.num_key_value_heads = hf.num_key_value_heads;
  c.axes = hf.axes;
  return WithTables(std::move(c));
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

std::string DictToJson(py::handle obj) {
  try {
    return py::module_::import("json")
        .attr("dumps")(obj, py::arg("allow_nan") = false)
        .cast<std::string>();
  } catch (const py::error_already_set& e) {
    if (e.matches(PyExc_ValueError)) {
      throw py::value_error("config dict contains a non-finite number (NaN or infinity): " +
                            std::string(e.what()));
    }
    throw py::type_error("config dict is not JSON-serialisable: " + std::string(e.what()));
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
    const std::string text = DictToJson(obj);
    return ParseOrValueError([&] { return ParseHfConfig(text, lt); }, "config dict");
  }
  py::object os = py::module_::import("os");
  if (py::isinstance<py::str>(obj) || py::isinstance(obj, os.attr("PathLike"))) {
    const std::string path = py::str(os.attr("fspath")(obj)).cast<std::string>();
    return ParseOrValueError([&] { return LoadHfConfig(path, lt); }, path);
  }
  throw py::type_error(
      "from_hf_config expects a dict, a path (str / os.PathLike) or an object with to_dict(), "
      "got " +
      TypeName(source));
}

py::array_t<double> ToNumpy(const std::vector<double>& v) {
  py::array_t<double> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

RopeFrequencies Frequencies(const Config& c, std::optional<int64_t> seq_len,
                            const std::string& numerics) {
  const Numerics n = NumericsArg(numerics);
  return ComputeFrequencies(c.params, n, FrequencySeqLen(c.params, seq_len.value_or(0)));
}

py::tuple CosSin(const Config& c, py::handle positions, const std::string& numerics,
                 std::optional<int64_t> seq_len) {
  const Positions pos = InspectPositions(positions, 1, -1);
  if (pos.rows != 1) throw py::value_error("positions must be 1-D for cos_sin");
  const auto table = c.Table(numerics, seq_len, pos.max_position);
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
}

// A read-only property for one RopeParams field.
template <auto Field>
void Param(py::class_<Config>& cls, const char* name) {
  cls.def_property_readonly(name, [](const Config& c) { return c.params.*Field; });
}

}  // namespace

std::shared_ptr<const RopeTable> Config::Table(const std::string& numerics,
                                               std::optional<int64_t> seq_len,
                                               int64_t max_position) const {
  const Numerics n = NumericsArg(numerics);
  return tables->Get(n, seq_len.value_or(max_position + 1));
}

Layout Config::LayoutOr(const std::optional<std::string>& name) const {
  if (!name) return layout;
  return Named("layout", [&] { return ParseLayout(*name); });
}

void AddRopeConfig(py::module_& m) {
  py::class_<Config> cls(m, "RopeConfig", R"doc(
RoPE parameters (field names follow the Hugging Face config keys) plus the channel layout.

Immutable; build one with RopeConfig(head_dim=..., ...) or RopeConfig.from_hf_config(...).
Each config caches its cos/sin tables per (numerics, sequence length), so reuse the object.
)doc");
  cls.def(py::init(&MakeConfig), py::kw_only(), py::arg("rope_type") = "default",
          py::arg("base") = 10000.0, py::arg("head_dim"), py::arg("rotary_dim") = py::none(),
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
          "first invalid field.");
  cls.def_static("from_hf_config", &FromHfConfig, py::arg("config"),
                 py::arg("layer_type") = py::none(),
                 "Builds a config from a Hugging Face config.json: a dict, a path, or an object "
                 "with to_dict() (transformers.PretrainedConfig). layer_type selects one entry "
                 "of a per-layer-type rope_parameters dict (e.g. 'sliding_attention').");
  Param<&RopeParams::base>(cls, "base");
  Param<&RopeParams::head_dim>(cls, "head_dim");
  Param<&RopeParams::rotary_dim>(cls, "rotary_dim");
  Param<&RopeParams::max_position_embeddings>(cls, "max_position_embeddings");
  Param<&RopeParams::factor>(cls, "factor");
  Param<&RopeParams::ntk_alpha>(cls, "ntk_alpha");
  Param<&RopeParams::original_max_position_embeddings>(cls, "original_max_position_embeddings");
  Param<&RopeParams::beta_fast>(cls, "beta_fast");
  Param<&RopeParams::beta_slow>(cls, "beta_slow");
  Param<&RopeParams::mscale>(cls, "mscale");
  Param<&RopeParams::mscale_all_dim>(cls, "mscale_all_dim");
  Param<&RopeParams::truncate>(cls, "truncate");
  Param<&RopeParams::short_factor>(cls, "short_factor");
  Param<&RopeParams::long_factor>(cls, "long_factor");
  Param<&RopeParams::low_freq_factor>(cls, "low_freq_factor");
  Param<&RopeParams::high_freq_factor>(cls, "high_freq_factor");
  cls.def_property_readonly(
      "rope_type", [](const Config& c) { return std::string(RopeTypeName(c.params.type)); });
  cls.def_property_readonly("layout",
                            [](const Config& c) { return std::string(LayoutName(c.layout)); });
  cls.def_property_readonly("model_type", [](const Config& c) { return c.model_type; });
  cls.def_property_readonly("mrope_section", [](const Config& c) { return c.axes.sections; });
  cls.def_property_readonly("mrope_interleaved",
                            [](const Config& c) { return c.axes.interleaved; });
  cls.def_property_readonly("num_attention_heads",
                            [](const Config& c) { return c.num_attention_heads; });
  cls.def_property_readonly("num_key_value_heads", [](const Config& c) {
    return c.num_key_value_heads > 0 ? c.num_key_value_heads : c.num_attention_heads;
  });
  cls.def_property_readonly(
      "attention_factor",
      [](const Config& c) {
        return ComputeFrequencies(c.params, Numerics::kExact).attention_factor;
      },
      "The magnitude factor A multiplying cos and sin (exact numerics, sequence length "
      "not given). See attention_factor_for().");
  cls.def(
      "attention_factor_for",
      [](const Config& c, std::optional<int64_t> seq_len, const std::string& numerics) {
        return Frequencies(c, seq_len, numerics).attention_factor;
      },
      py::arg("seq_len") = py::none(), py::arg("numerics") = "exact",
      "A for a given current sequence length and numerics ('exact' or 'hf').");
  cls.def(
      "inv_freq",
      [](const Config& c, std::optional<int64_t> seq_len, const std::string& numerics) {
        return ToNumpy(Frequencies(c, seq_len, numerics).inv_freq);
      },
      py::arg("seq_len") = py::none(), py::arg("numerics") = "exact",
      "Inverse frequencies w_i, i < N = rotary_dim / 2, as a float64 array. seq_len: the "
      "current sequence length for 'dynamic' / 'longrope' (None: not given).");
  cls.def("cos_sin", &CosSin, py::arg("positions"), py::arg("numerics") = "exact",
          py::arg("seq_len") = py::none(),
          "(cos, sin): float32 arrays [T, N] for the given positions, attention factor "
          "applied: exactly the values the kernels use. seq_len as in apply_rope.");
  cls.def("__repr__", &Repr);
}

}  // namespace ropekit::python
