// ropekit Python module: NumPy arrays and torch tensors as library views, without copying and
// without linking libtorch (a tensor is read through its Python attributes: data_ptr(),
// stride(), shape, dtype, device).
//
// Dimension legend: A = position axes, B = batch, T = tokens, H = heads, D = head_dim.
#ifndef ROPEKIT_PYTHON_ARRAYS_H_
#define ROPEKIT_PYTHON_ARRAYS_H_

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ropekit/rope.h"

namespace ropekit::python {

namespace py = pybind11;

std::string TypeName(py::handle obj);
std::string ShapeString(const std::vector<int64_t>& v);
// sys.modules["torch"], or None when the caller has not imported torch (ropekit never does).
py::object TorchModule();

// A floating-point array: float32, float16 or float64 (NumPy) or also bfloat16 (torch).
struct Array {
  py::object obj;  // keeps the memory alive
  bool is_torch = false;
  DType dtype = DType::kF32;
  char* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements
  bool writeable = true;

  int64_t NumElements() const;
  // Channels contiguous and no negative stride: the library can read it as it is.
  bool KernelReadable() const;
  // Readable and every index addresses its own element: it can be written in place.
  bool KernelWritable() const;
};

// TypeError / ValueError naming `name` for anything else (dtype, device, layout, alignment).
Array InspectFloat(py::handle h, const std::string& name);
// A contiguous copy of `a`, and a new contiguous array (same kind, dtype and shape).
Array ContiguousCopy(const Array& a, const std::string& name);
Array EmptyLike(const Array& a, const std::string& name);
// `a` must be a torch tensor not recording autograd history (ValueError otherwise).
void CheckNoGradRecording(const Array& a, const std::string& name);
// Writes through data_ptr() bypass autograd's version counter; an empty in-place op on a view
// (views share the counter) bumps it, so autograd detects the modification of a saved tensor.
void BumpVersion(const Array& a);
// Every array has the kind (numpy / torch) and dtype of the first (TypeError naming both).
void SameFamily(const std::vector<std::pair<const Array*, std::string>>& arrays);

// [B, T, H, D] interpretation of a 3-D or 4-D array ([H, T, D] / [B, H, T, D] when head_major).
struct Batched {
  char* data = nullptr;
  DType dtype = DType::kF32;
  int64_t B = 1, T = 0, H = 0, D = 0;
  int64_t batch_stride = 0, token_stride = 0, head_stride = 0;  // elements

  TensorView View(int64_t b) const;
};
Batched Interpret(const Array& a, bool head_major, const std::string& name);

// Positions: (T,) shared by the batch or (B, T); with A > 1 axes (M-RoPE), (A, T) or (A, B, T).
struct Positions {
  py::object owner;
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  int64_t axes = 1;
  int64_t rows = 1;  // 1 (shared by the batch) or B
  int64_t T = 0;
  int64_t max_position = -1;

  PositionSpan Row(int64_t b, int64_t a = 0) const;
  std::vector<PositionSpan> AxisRows(int64_t b) const;
};
// num_tokens < 0: any T. Every position must be in [0, kMaxPosition].
Positions InspectPositions(py::handle h, int64_t batch, int64_t num_tokens);
Positions InspectAxisPositions(py::handle h, int64_t num_axes, int64_t batch, int64_t num_tokens);
// A 1-D integer array of `count` entries (count < 0: any).
std::vector<int64_t> ReadSlots(py::handle h, int64_t count);

}  // namespace ropekit::python

#endif  // ROPEKIT_PYTHON_ARRAYS_H_
