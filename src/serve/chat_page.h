// The chat page served at GET / by ropekit serve: one self-contained HTML document (inline CSS
// and JavaScript, no external scripts, fonts or network resources other than this server's own
// /v1/chat/completions). It streams the reply token by token and shows tokens/s.
#ifndef ROPEKIT_SRC_SERVE_CHAT_PAGE_H_
#define ROPEKIT_SRC_SERVE_CHAT_PAGE_H_

#include <string>

namespace ropekit::serve {

const std::string& ChatPageHtml();

}  // namespace ropekit::serve

#endif  // ROPEKIT_SRC_SERVE_CHAT_PAGE_H_
