// ropekit: the one exception type of the public API.
//
// Every invalid input (a config field out of range, a malformed file, a tensor of the wrong shape)
// is reported by throwing ropekit::Error whose message names the offending field and the accepted
// range. Kernels never crash on bad input: validation happens at the API boundary.
#ifndef ROPEKIT_ERROR_H_
#define ROPEKIT_ERROR_H_

#include <stdexcept>
#include <string>

namespace ropekit {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace ropekit

#endif  // ROPEKIT_ERROR_H_
