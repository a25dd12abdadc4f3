// `ropekit study`: the length-extrapolation study (train short, test long, extend the context)
// with tables on the terminal and results.json / results.csv / report.html in --out.
// `ropekit corpus`: fetches and extracts the Austen novels only.
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "ropekit/distributed.h"
#include "ropekit/study.h"
#include "tools/command.h"

namespace ropekit::cli {
namespace {

// --report-only: the tables and report.html from what --out holds; nothing is trained.
int RewriteReportOf(const std::string& out) {
  study::StudyPreset preset;
  const study::StudyResult r = study::RewriteReport(out, &preset);
  std::printf("%s", study::SummaryTables(preset, r.records).c_str());
  std::printf("\nreport:  %s/report.html (rewritten from %s/results.json)\n", out.c_str(),
              out.c_str());
  return 0;
}

int RunStudyOn(const study::StudyOptions& o) {
  const study::StudyResult r = study::RunStudy(o);
  if (o.comm && o.comm->rank() != 0) return 0;  // rank 0 reports
  const study::StudyPreset preset = study::GetStudyPreset(o.preset);
  std::printf("%s", study::SummaryTables(preset, r.records).c_str());
  std::printf("\n%zu runs computed, %zu reused; %.0f s (compute time of all runs: %.0f s)\n",
              r.trained_units.size(), r.reused_units.size(), r.seconds, r.compute_seconds);
  std::printf("results: %s/results.json, %s/results.csv\nreport:  %s/report.html\n", o.out.c_str(),
              o.out.c_str(), o.out.c_str());
  return 0;
}

// Under mpirun the ranks share the units. Ranks wait for each other only between phases, for as
// long as a unit trains, so the wait has no practical deadline; mpirun stops the job when a rank
// dies, and an error on any rank stops all of them.
int RunStudyCommand(study::StudyOptions o) {
  CommunicatorOptions co;
  co.timeout_s = 365.0 * 24 * 3600;
  std::unique_ptr<Communicator> world = ConnectRanks(nullptr, nullptr, co);
  if (!world) return RunStudyOn(o);
  o.comm = world.get();
  try {
    return RunStudyOn(o);
  } catch (const std::exception& e) {
    world->Abort(e.what());
  }
  return 1;
}

const CommandRegistration kStudy{
    "study",
    "Length-extrapolation study: train each position encoding at L, evaluate at 1x-8x L, extend "
    "RoPE (PI, NTK, dynamic NTK, YaRN, Llama 3.1) with and without fine-tuning; writes tables, "
    "results.json/.csv and report.html",
    [](CLI::App* sub) -> std::function<int()> {
      auto o = std::make_shared<study::StudyOptions>();
      sub->add_option("--preset", o->preset,
                      "micro (seconds, for tests), quick (~10 min on 2 cores), full (the "
                      "protocol, ~100 min; resumable)")
          ->capture_default_str();
      sub->add_option("--corpus", o->corpus,
                      "Text files to use instead of the Austen novels: the last file is held out "
                      "(one file: its last 10%)")
          ->check(CLI::ExistingFile);
      sub->add_option("--data-dir", o->data_dir,
                      "Cache of the downloaded Austen corpus (apt-get download + extraction)")
          ->capture_default_str();
      sub->add_option("--out", o->out, "Output directory (runs are reused on rerun)")
          ->capture_default_str();
      sub->add_option("--threads", o->threads, "Worker threads (0 = all cores)")
          ->capture_default_str();
      sub->add_option("--seed", o->seed, "Initialisation and data-order seed")
          ->capture_default_str();
      sub->add_option("--seeds", o->seeds,
                      "Seeds per configuration (seed, seed + 1, ...): tables show mean ± sd, "
                      "results.json keeps every seed and the aggregates")
          ->capture_default_str();
      auto report_only = std::make_shared<bool>(false);
      sub->add_flag("--report-only", *report_only,
                    "Rewrite the tables and report.html from --out's results.json; train "
                    "nothing");
      sub->add_flag(
          "--quiet", [o](int64_t) { o->verbose = false; }, "No progress lines");
      return
          [o, report_only] { return *report_only ? RewriteReportOf(o->out) : RunStudyCommand(*o); };
    }};

const CommandRegistration kCorpus{
    "corpus",
    "Fetch the study corpus: the six Austen novels of Debian's r-cran-janeaustenr, extracted to "
    "<data-dir>/austen/*.txt (no R needed); prints their paths",
    [](CLI::App* sub) -> std::function<int()> {
      auto dir = std::make_shared<std::string>("data");
      sub->add_option("--data-dir", *dir, "Cache directory")->capture_default_str();
      return [dir] {
        for (const std::string& p : study::FetchAustenCorpus(
                 *dir, [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); })) {
          std::printf("%s\n", p.c_str());
        }
        return 0;
      };
    }};

}  // namespace
}  // namespace ropekit::cli
