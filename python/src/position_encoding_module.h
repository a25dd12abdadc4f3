// ropekit Python module: registration of the non-RoPE position encodings.
#ifndef ROPEKIT_PYTHON_POSITION_ENCODING_MODULE_H_
#define ROPEKIT_PYTHON_POSITION_ENCODING_MODULE_H_

#include <pybind11/pybind11.h>

namespace ropekit::python {

// Adds alibi_slopes, alibi_bias, t5_relative_bucket and sinusoidal_table to `m`.
void AddPositionEncodings(pybind11::module_& m);

}  // namespace ropekit::python

#endif  // ROPEKIT_PYTHON_POSITION_ENCODING_MODULE_H_
