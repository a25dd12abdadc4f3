// ropekit command line entry point. Subcommands live in tools/cmd_*.cc.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>
#include <new>

#include "command.h"
#include "ropekit/error.h"

namespace ropekit::cli {
std::vector<Command>& Registry() {
  static std::vector<Command> registry;
  return registry;
}
}  // namespace ropekit::cli

int main(int argc, char** argv) {
  using ropekit::cli::Registry;
  CLI::App app{"ropekit: rotary position embeddings and their relatives, exact and fast"};
  app.require_subcommand(1);
  std::sort(Registry().begin(), Registry().end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  std::map<CLI::App*, std::function<int()>> runners;
  for (auto& command : Registry()) {
    CLI::App* sub = app.add_subcommand(command.name, command.description);
    runners[sub] = command.setup(sub);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version print and succeed; usage errors get the same one-line format as
    // every other error.
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    std::fprintf(stderr, "ropekit: error: %s (see --help)\n", e.what());
    return e.get_exit_code();
  }
  try {
    for (auto& [sub, run] : runners) {
      if (sub->parsed()) return run();
    }
  } catch (const ropekit::Error& e) {
    std::fprintf(stderr, "ropekit: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr,
                 "ropekit: error: out of memory: the sizes asked for (model, batch, context or "
                 "table options) need more memory than this machine has\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ropekit: error: %s\n", e.what());
    return 1;
  }
  return 1;
}
