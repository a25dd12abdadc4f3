#include "ropekit/json_limits.h"

#include "ropekit/error.h"

namespace ropekit {

void CheckJsonLimits(std::string_view text, const std::string& name) {
  if (text.size() > kMaxJsonBytes) {
    throw Error(name + ": " + std::to_string(text.size()) +
                " bytes of JSON, more than the limit of " + std::to_string(kMaxJsonBytes));
  }
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        throw Error(name + ": JSON nesting deeper than " + std::to_string(kMaxJsonDepth) +
                    " levels at byte " + std::to_string(i + 1));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

}  // namespace ropekit
