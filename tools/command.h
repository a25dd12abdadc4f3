// ropekit command line: subcommands register themselves here.
//
// Each tools/cmd_*.cc defines a static CommandRegistration that adds its CLI11 subcommand and the
// function that runs it. main.cc parses, then runs the chosen one; an Error becomes a one-line
// message on stderr and exit code 1.
#ifndef ROPEKIT_TOOLS_COMMAND_H_
#define ROPEKIT_TOOLS_COMMAND_H_

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace ropekit::cli {

struct Command {
  std::string name;
  // Adds the subcommand's options to `sub`; returns the function that runs it after parsing.
  std::function<std::function<int()>(CLI::App* sub)> setup;
  std::string description;
};

std::vector<Command>& Registry();

struct CommandRegistration {
  CommandRegistration(std::string name, std::string description,
                      std::function<std::function<int()>(CLI::App*)> setup) {
    Registry().push_back({std::move(name), std::move(setup), std::move(description)});
  }
};

}  // namespace ropekit::cli

#endif  // ROPEKIT_TOOLS_COMMAND_H_
