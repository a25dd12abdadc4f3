// Tests of the extrapolation study's building blocks: the R data reader (against byte streams
// built here by hand from the format description), the tail-protocol windows (same scored tokens
// at every length; agreement with the model library's own tail evaluation), the RoFormer decay
// bound (published values) and the RoPE scalings. Kept small: this binary also runs under ASan.
#include "ropekit/study.h"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <set>
#include <sstream>

#include "gtest/gtest.h"
#include "src/study/svg_plot.h"

namespace ropekit::study {
namespace {

// ---- Hand-built R XDR serializations ---------------------------------------------------------

void PutInt(std::string& s, int32_t v) {
  const uint32_t u = static_cast<uint32_t>(v);
  for (int shift : {24, 16, 8, 0}) s += static_cast<char>((u >> shift) & 0xff);
}
std::string Header() {
  std::string s = "X\n";
  PutInt(s, 3);       // version
  PutInt(s, 262656);  // writer 4.2.0
  PutInt(s, 197888);  // min reader 3.5.0
  PutInt(s, 5);
  s += "UTF-8";
  return s;
}
void PutChar(std::string& s, const std::string* str) {  // nullptr = NA
  PutInt(s, 9 | (1 << 15) /* UTF-8 level bit */);
  if (!str) {
    PutInt(s, -1);
    return;
  }
  PutInt(s, static_cast<int32_t>(str->size()));
  s += *str;
}
void PutStrVector(std::string& s, const std::vector<std::string>& v, int attr_flag = 0) {
  PutInt(s, 16 | attr_flag);
  PutInt(s, static_cast<int32_t>(v.size()));
  for (const std::string& x : v) PutChar(s, &x);
}
// A pairlist attribute cell "names" (symbol), with the symbol either new or a reference.
void PutNamesAttribute(std::string& s, const std::vector<std::string>& names, int& symbols,
                       int& names_ref) {
  PutInt(s, 2 | (1 << 10));  // LISTSXP with tag
  if (names_ref == 0) {
    PutInt(s, 1);  // SYMSXP
    const std::string n = "names";
    PutChar(s, &n);
    names_ref = ++symbols;
  } else {
    PutInt(s, 255 | (names_ref << 8));  // REFSXP
  }
  PutStrVector(s, names);
  PutInt(s, 254);  // end of pairlist
}

std::string Compress(const std::string& data, bool gzip) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, 6, Z_DEFLATED, gzip ? 31 : 15, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::string out(deflateBound(&zs, data.size()) + 32, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

TEST(StudyCorpus, ParsesCharacterVectorWithNaAndUtf8) {
  std::string s = Header();
  PutInt(s, 16);
  PutInt(s, 3);
  const std::string a = "It is a truth universally acknowledged", b = "caf\xc3\xa9";
  PutChar(s, &a);
  PutChar(s, nullptr);
  PutChar(s, &b);
  EXPECT_EQ(ParseRCharacterVector(s, "x"), (std::vector<std::string>{a, "", b}));
  // Truncated, wrong magic and wrong type are errors naming the data.
  EXPECT_THROW(ParseRCharacterVector(s.substr(0, s.size() - 2), "x"), Error);
  EXPECT_THROW(ParseRCharacterVector("A\n" + s.substr(2), "x"), Error);
  std::string ints = Header();
  PutInt(ints, 13);
  PutInt(ints, 1);
  PutInt(ints, 7);
  try {
    ParseRCharacterVector(ints, "blob");
    FAIL() << "an integer vector was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("blob"), std::string::npos);
  }
}

TEST(StudyCorpus, ReadsLazyLoadDatabase) {
  // Two objects in the .rdb: [u32 BE uncompressed length][zlib stream] each.
  const std::vector<std::string> first = {"Chapter 1", "", "Sir Walter Elliot"};
  const std::vector<std::string> second = {"EMMA"};
  std::string rdb, offsets;
  std::vector<std::pair<int, int>> loc;
  for (const auto* v : {&first, &second}) {
    std::string ser = Header();
    PutStrVector(ser, *v);
    std::string entry;
    PutInt(entry, static_cast<int32_t>(ser.size()));
    entry += Compress(ser, false);
    loc.emplace_back(static_cast<int>(rdb.size()), static_cast<int>(entry.size()));
    rdb += entry;
  }
  // Index: list(variables = list(persuasion = c(off, len), emma = c(off, len)),
  //             references = list(), compressed = TRUE), gzip-compressed.
  int symbols = 0, names_ref = 0;
  std::string rdx = Header();
  PutInt(rdx, 19 | (1 << 9));  // VECSXP with attributes
  PutInt(rdx, 3);
  PutInt(rdx, 19 | (1 << 9));  // variables
  PutInt(rdx, 2);
  for (auto [off, len] : loc) {
    PutInt(rdx, 13);
    PutInt(rdx, 2);
    PutInt(rdx, off);
    PutInt(rdx, len);
  }
  PutNamesAttribute(rdx, {"persuasion", "emma"}, symbols, names_ref);
  PutInt(rdx, 19);  // references: empty list
  PutInt(rdx, 0);
  PutInt(rdx, 10);  // compressed: TRUE
  PutInt(rdx, 1);
  PutInt(rdx, 1);
  PutNamesAttribute(rdx, {"variables", "references", "compressed"}, symbols, names_ref);

  const auto dir =
      std::filesystem::temp_directory_path() /
      ("ropekit_study_rdb_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()));
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& data) {
    std::ofstream(dir / name, std::ios::binary) << data;
    return (dir / name).string();
  };
  const std::string rdb_path = write("Rdata.rdb", rdb);
  const std::string rdx_path = write("Rdata.rdx", Compress(rdx, true));
  const auto objects = ReadRLazyLoadDb(rdb_path, rdx_path);
  ASSERT_EQ(objects.size(), 2u);
  EXPECT_EQ(objects[0].first, "persuasion");
  EXPECT_EQ(objects[0].second, first);
  EXPECT_EQ(objects[1].first, "emma");
  EXPECT_EQ(objects[1].second, second);
  // A corrupted entry is reported with the object's name.
  std::string bad = rdb;
  bad[static_cast<size_t>(loc[1].first) + 8] ^= 0x55;
  write("Rdata.rdb", bad);
  try {
    ReadRLazyLoadDb(rdb_path, rdx_path);
    ADD_FAILURE() << "a corrupt entry was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("emma"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

// ---- Tail protocol ----------------------------------------------------------------------------

TEST(StudyTail, SameScoredTokensAtEveryLength) {
  const int64_t n = 5003, tail = 24;
  const std::vector<int64_t> contexts = {32, 64, 128, 256};
  const std::vector<int64_t> ends = TailWindowEnds(n, 256, 37);
  ASSERT_EQ(ends.size(), 37u);
  EXPECT_EQ(ends.front(), 257);  // the longest window starts at token 0
  EXPECT_EQ(ends.back(), n);     // the last target is the last token
  EXPECT_TRUE(std::is_sorted(ends.begin(), ends.end()));
  std::set<int64_t> reference;
  for (int64_t c : contexts) {
    const auto windows = PlanTailWindows(ends, c, tail, n);
    std::multiset<int64_t> scored;
    for (size_t k = 0; k < windows.size(); ++k) {
      const TailWindow& w = windows[k];
      EXPECT_GE(w.input_begin, 0);
      EXPECT_LE(w.end, n);
      EXPECT_EQ(w.end - w.input_begin, c + 1);  // C inputs, targets shifted by one
      EXPECT_EQ(w.end - w.scored_begin, tail);
      for (int64_t t = w.scored_begin; t < w.end; ++t) scored.insert(t);
    }
    std::set<int64_t> unique(scored.begin(), scored.end());
    if (reference.empty()) {
      reference = unique;
    } else {
      EXPECT_EQ(unique, reference) << "context " << c;
    }
    EXPECT_EQ(scored.size(), ends.size() * tail);
  }
  EXPECT_THROW(PlanTailWindows(ends, 512, tail, n), Error);  // longer than planned: no room
  EXPECT_THROW(PlanTailWindows(ends, 16, 17, n), Error);     // tail > context
  EXPECT_THROW(TailWindowEnds(100, 100, 4), Error);
}

ModelConfig TinyModel(const char* pe) {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.intermediate_size = 24;
  c.max_position_embeddings = 16;
  c.position_encoding.kind = ParsePositionEncodingKind(pe);
  return c.Resolved();
}

TEST(StudyTail, AgreesWithTheModelLibraryTailProtocol) {
  // Evaluate() (src/model/eval.cc) implements the same protocol independently; the scored
  // tokens and the forward passes (same windows, same batch) are identical, so the two means
  // differ only by the order of a double summation of at most 6 * 5 float losses.
  for (const char* pe : {"rope", "alibi"}) {
    Model model(TinyModel(pe), 7);
    std::vector<int32_t> tokens(701);
    uint64_t x = 12345;
    for (int32_t& t : tokens) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      t = static_cast<int32_t>((x >> 33) % 256);
    }
    EvalOptions eo;
    eo.contexts = {8, 16, 40};
    eo.max_windows = 1;
    eo.num_tail_windows = 6;
    eo.tail = 5;
    eo.batch = 4;
    const auto ref = Evaluate(model, tokens, eo, nullptr);
    const auto ends = TailWindowEnds(static_cast<int64_t>(tokens.size()), 40, 6);
    for (size_t i = 0; i < eo.contexts.size(); ++i) {
      const double mine = TailLoss(model, tokens, ends, eo.contexts[i], 5, 4, nullptr);
      EXPECT_NEAR(mine, ref[i].tail_loss, 1e-12 * ref[i].tail_loss) << pe << " " << eo.contexts[i];
    }
  }
}

// ---- RoFormer decay bound and scalings -------------------------------------------------------

TEST(StudyDecay, MatchesRoformerFigure2Values) {
  // theta_i = 10000^(-2i/d); reference values (three decimals, evaluated independently from
  // RoFormer's bound, Su et al. 2021, arXiv:2104.09864 sec. 3.4.3 and Figure 2; d = 128 is the
  // RoFormer figure, d = 32 the study's head_dim):
  // tolerance half a unit in the last printed place.
  const std::vector<int> rs = {0, 1, 2, 5, 10, 20, 50, 100, 150, 200, 250};
  const std::vector<std::pair<int, std::vector<double>>> reference = {
      {128, {32.5, 31.538, 28.956, 20.845, 17.954, 15.242, 12.629, 10.227, 7.588, 7.245, 6.548}},
      {32, {8.5, 8.146, 7.226, 5.303, 4.151, 4.532, 2.737, 4.379, 3.083, 3.729, 2.424}}};
  for (const auto& [d, values] : reference) {
    std::vector<double> w(d / 2);
    for (int i = 0; i < d / 2; ++i) w[i] = std::pow(10000.0, -2.0 * i / d);
    const std::vector<double> c = RopeDecayCurve(w, 250);
    ASSERT_EQ(c.size(), 251u);
    EXPECT_DOUBLE_EQ(c[0], (d / 2 + 1) / 2.0);  // |S_j(0)| = j
    for (size_t k = 0; k < rs.size(); ++k) {
      EXPECT_NEAR(c[rs[k]], values[k], 0.0005 + 1e-12) << "d = " << d << ", r = " << rs[k];
    }
  }
  // Window means of the reference are over a grid of step 0.5: halving every frequency turns
  // integer distances 2r into r / 2 steps. The curve is not monotone; the window means are.
  std::vector<double> half(64);
  for (int i = 0; i < 64; ++i) half[i] = 0.5 * std::pow(10000.0, -2.0 * i / 128.0);
  const std::vector<double> c = RopeDecayCurve(half, 500);
  auto mean = [&](int a, int b) {  // r in [a, b) on the 0.5 grid
    double s = 0;
    for (int k = 2 * a; k < 2 * b; ++k) s += c[k];
    return s / (2 * (b - a));
  };
  EXPECT_NEAR(mean(5, 25), 16.791, 0.0005);
  EXPECT_NEAR(mean(100, 125), 9.628, 0.0005);
  EXPECT_NEAR(mean(225, 250), 8.044, 0.0005);
}

TEST(StudyScaling, FactorsFollowThePublishedFormulas) {
  RopeParams base;
  base.head_dim = 32;
  base.rotary_dim = 32;
  const int64_t L = 128;
  // Plain and s = 1 are the unscaled frequencies.
  for (const char* s : {"none", "linear", "ntk", "yarn", "llama3"}) {
    const double f = std::string_view(s) == "none" ? 4.0 : 1.0;
    EXPECT_EQ(ScaledRope(base, s, f, L).type, RopeType::kDefault) << s;
  }
  auto w = [&](const char* s, double f) {
    return ComputeFrequencies(ScaledRope(base, s, f, L), Numerics::kExact).inv_freq;
  };
  const auto w0 = w("none", 1);
  // PI: every frequency divided by s (positions m / s).
  for (size_t i = 0; i < w0.size(); ++i) EXPECT_NEAR(w("linear", 4)[i], w0[i] / 4, 1e-15);
  // NTK-aware: base' = base s^(R/(R-2)) = 20946, 43873, 91896 for s = 2, 4, 8 (R = 32).
  const std::vector<std::pair<double, double>> ntk = {{2, 20946}, {4, 43873}, {8, 91896}};
  for (auto [s, b] : ntk) {
    const double implied = std::pow(w("ntk", s)[1], -16.0);  // w_1 = base'^(-2/32)
    EXPECT_NEAR(implied, b, 0.5 + 1e-9 * b) << s;
  }
  // Llama 3.1, factor 4, low 1, high 4, original 128: wavelengths below 32 kept, above 128
  // divided by 4.
  const auto l3 = w("llama3", 4);
  for (size_t i = 0; i < w0.size(); ++i) {
    const double wavelength = 2 * std::numbers::pi / w0[i];
    if (wavelength < 32) {
      EXPECT_NEAR(l3[i], w0[i], 1e-7 * w0[i]);
    }
    if (wavelength > 128) {
      EXPECT_NEAR(l3[i], w0[i] / 4, 1e-7 * w0[i]);
    }
  }
  EXPECT_EQ(ScaledRope(base, "dynamic", 1, L).type, RopeType::kDynamic);
  EXPECT_THROW(ScaledRope(base, "bogus", 2, L), Error);
  EXPECT_THROW(ScaledRope(base, "linear", 0.5, L), Error);
}

TEST(StudyPreset, KnownNamesOnly) {
  for (const char* n : {"micro", "quick", "full", "paper"}) {
    const StudyPreset p = GetStudyPreset(n);
    for (const std::string& e : p.experiments) {
      if (e == "pi-cutoff") continue;
      const ModelConfig m = StudyExperimentModel(p, e);  // a valid model
      if (e == "alibi-heads") {
        EXPECT_EQ(m.num_heads, p.alibi_heads) << n;
        EXPECT_EQ(m.head_dim * m.num_heads, m.hidden_size) << n;
      } else {
        EXPECT_EQ(m.position_encoding.max_distance, p.train.seq_len / 4) << n;
      }
    }
    EXPECT_EQ(p.encodings.size(), 6u);
    EXPECT_EQ(p.finetune.seq_len, p.extension_factor * p.train.seq_len);
    EXPECT_EQ(p.finetune.batch_size * p.finetune.seq_len, p.train.batch_size * p.train.seq_len);
    EXPECT_EQ(p.finetune_steps.back(), p.finetune.steps);
  }
  const StudyPreset full = GetStudyPreset("full");
  EXPECT_EQ(full.train.steps, 1000);
  EXPECT_EQ(full.train.seq_len, 128);
  EXPECT_EQ(full.model.hidden_size, 128);
  EXPECT_THROW(GetStudyPreset("huge"), Error);
}

TEST(StudyMethods, PresetsAndAdapters) {
  // The comparison runs in micro (tests), full and paper; quick keeps its cost.
  EXPECT_TRUE(GetStudyPreset("quick").methods.empty());
  for (const char* n : {"micro", "full", "paper"}) {
    const StudyPreset p = GetStudyPreset(n);
    EXPECT_EQ(p.methods,
              (std::vector<std::string>{"full", "lora-qv", "lora-all", "lora-plus", "qlora"}))
        << n;
    EXPECT_EQ(p.method_scalings, (std::vector<std::string>{"yarn", "linear"})) << n;
    for (const std::string& m : p.methods) {
      if (m == "full") continue;
      const LoraConfig c = MethodLoraConfig(p, m);
      EXPECT_NO_THROW(c.Validate(StudyModel(p, "rope"))) << n << " " << m;
      EXPECT_EQ(c.rank, 8);
      EXPECT_EQ(c.alpha, 16.0);
      EXPECT_EQ(c.target_modules.size(), m == "lora-qv" ? 2u : 7u) << m;
      EXPECT_EQ(c.train_embeddings, m == "lora-plus") << m;
      EXPECT_EQ(c.train_norms, m == "lora-plus") << m;
      EXPECT_EQ(c.qlora, m == "qlora") << m;
    }
  }
  EXPECT_THROW(MethodLoraConfig(GetStudyPreset("micro"), "full"), Error);
  EXPECT_THROW(MethodLoraConfig(GetStudyPreset("micro"), "lora-xyz"), Error);
}

TEST(StudyMethods, RecordsKeepTheirMethod) {
  // A fine-tune record written before the comparison reads as a full fine-tune; one without
  // fine-tuning has no method.
  const std::string old_records = R"([
 {"encoding": "rope", "scaling": "yarn", "scaling_factor": 4.0, "finetune_steps": 5,
  "train_length": 16, "eval_length": 64, "tail_loss": 3.0, "window_loss": 3.5, "seed": 1,
  "bucket_size": 4, "position_loss": [1.0]},
 {"encoding": "rope", "scaling": "yarn", "scaling_factor": 4.0, "finetune_steps": 0,
  "train_length": 16, "eval_length": 64, "tail_loss": 3.0, "window_loss": 3.5, "seed": 1,
  "bucket_size": 4, "position_loss": [1.0]}])";
  const std::vector<StudyRecord> old = RecordsFromJson(old_records, "old");
  ASSERT_EQ(old.size(), 2u);
  EXPECT_EQ(old[0].method, "full");
  EXPECT_EQ(old[1].method, "");
  EXPECT_EQ(old[0].trainable_parameters, 0);
  // Round trip of a method record with its costs.
  StudyRecord r = old[0];
  r.method = "lora-plus";
  r.trainable_parameters = 12384;
  r.optimizer_bytes = 99072;
  r.seconds = 1.5;
  const std::vector<StudyRecord> back = RecordsFromJson(RecordsToJson({r}), "new");
  ASSERT_EQ(back.size(), 1u);
  EXPECT_EQ(back[0].method, "lora-plus");
  EXPECT_EQ(back[0].trainable_parameters, 12384);
  EXPECT_EQ(back[0].optimizer_bytes, 99072);
  EXPECT_EQ(back[0].seconds, 1.5);
  // Seeds aggregate per method: two methods, two seeds each, give two aggregates.
  std::vector<StudyRecord> per_seed;
  for (const char* m : {"full", "lora-qv"}) {
    for (uint64_t seed : {1, 2}) {
      StudyRecord x = old[0];
      x.method = m;
      x.seed = seed;
      x.tail_loss = static_cast<double>(seed);
      x.seconds = 2.0 * static_cast<double>(seed);
      per_seed.push_back(x);
    }
  }
  const std::vector<StudyRecord> agg = AggregateSeeds(per_seed);
  ASSERT_EQ(agg.size(), 2u);
  EXPECT_EQ(agg[0].method, "full");
  EXPECT_EQ(agg[1].method, "lora-qv");
  for (const StudyRecord& a : agg) {
    EXPECT_EQ(a.seeds, 2);
    EXPECT_EQ(a.tail_loss, 1.5);
    EXPECT_EQ(a.seconds, 3.0);  // mean wall time
  }
  // Costs must be positive when present.
  std::string bad = RecordsToJson({r});
  bad.replace(bad.find("12384"), 5, "0");
  EXPECT_THROW(RecordsFromJson(bad, "bad"), Error);
}

// Per-seed main-grid records of the micro preset: RoPE and ALiBi at every evaluation length.
// ALiBi - RoPE at every length is alibi_minus_rope[seed - 1].
std::vector<StudyRecord> TwoEncodingsThreeSeeds(const StudyPreset& p,
                                                const std::vector<double>& alibi_minus_rope) {
  std::vector<StudyRecord> out;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    for (int64_t m : p.eval_multipliers) {
      for (const char* e : {"rope", "alibi"}) {
        StudyRecord r;
        r.encoding = e;
        r.scaling = "none";
        r.train_length = p.train.seq_len;
        r.eval_length = m * p.train.seq_len;
        r.seed = seed;
        r.position_loss = {1.0};
        // RoPE's loss grows with length and seed; ALiBi adds the seed's difference.
        r.tail_loss = 1.0 + 0.1 * static_cast<double>(m) + 0.01 * static_cast<double>(seed);
        if (r.encoding == "alibi") r.tail_loss += alibi_minus_rope[seed - 1];
        r.window_loss = r.tail_loss;
        out.push_back(r);
      }
    }
  }
  return out;
}

TEST(StudySeeds, PairedDifferencesCarryStudentIntervals) {
  const StudyPreset p = GetStudyPreset("micro");
  // Differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1; t(0.975, 2) = 4.303 (standard tables), so the
  // half-width is 4.303 * 0.1 / sqrt(3) = 0.248 > 0.2: not significant. The change from 1x is
  // the same difference minus itself: exactly 0 for every seed, an interval of width 0.
  std::string md = MarkdownTables(p, TwoEncodingsThreeSeeds(p, {0.1, 0.2, 0.3}));
  const size_t at = md.find("| ALiBi - RoPE |");
  ASSERT_NE(at, std::string::npos) << md;
  const std::string row = md.substr(at, md.find('\n', at) - at);
  EXPECT_NE(row.find("| +0.200 ± 0.248 |"), std::string::npos) << row;
  EXPECT_EQ(row.find('*'), std::string::npos) << row;
  EXPECT_NE(row.find("| +0.000 ± 0.000 |"), std::string::npos) << row;
  // Differences 0.5, 0.5, 0.6: mean 0.5333, sd 0.0577, half-width 4.303 * 0.0577 / sqrt(3) =
  // 0.143 < 0.533: significant.
  md = MarkdownTables(p, TwoEncodingsThreeSeeds(p, {0.5, 0.5, 0.6}));
  EXPECT_NE(md.find("| +0.533 ± 0.143 * |"), std::string::npos) << md;
  // The main table shows mean ± sd: RoPE at 1x is 1.1 + 0.01 * seed, mean 1.12, sd 0.01.
  EXPECT_NE(md.find("| RoPE | 1.120 ± 0.010 |"), std::string::npos) << md;
  // One seed: no paired differences.
  std::vector<StudyRecord> one = TwoEncodingsThreeSeeds(p, {0.1, 0.2, 0.3});
  std::erase_if(one, [](const StudyRecord& r) { return r.seed != 1; });
  EXPECT_EQ(MarkdownTables(p, one).find("Paired differences"), std::string::npos);
}

TEST(StudySeeds, PlotBandsSpanOneSpreadAroundTheLine) {
  PlotSpec spec;
  spec.id = "p";
  Series line{"a", {{0.0, 1.0}, {1.0, 2.0}, {2.0, 1.5}}, false};
  EXPECT_EQ(SvgPlot(spec, {line}).find("class=\"band\""), std::string::npos);
  line.spread = {0.0, 0.0, 0.0};  // a single seed: no band either
  EXPECT_EQ(SvgPlot(spec, {line}).find("class=\"band\""), std::string::npos);
  line.spread = {0.5, 0.25, 0.5};
  const std::string svg = SvgPlot(spec, {line});
  const size_t at = svg.find("class=\"band\" points=\"");
  ASSERT_NE(at, std::string::npos) << svg;
  // The band runs along y + w forwards and y - w backwards: six vertices. The y range is
  // [0.5, 2.5] padded by 6%, so the top vertex 2.25 and the bottom 0.5 sit inside the frame.
  const size_t from = at + std::string("class=\"band\" points=\"").size();
  const std::string points = svg.substr(from, svg.find('"', from) - from);
  std::vector<std::pair<double, double>> v;
  std::istringstream in(points);
  std::string xy;
  while (in >> xy) v.emplace_back(std::stod(xy), std::stod(xy.substr(xy.find(',') + 1)));
  ASSERT_EQ(v.size(), 6u) << points;
  // Screen y grows downwards and is linear in data y: upper[k] - lower[k] is proportional to
  // 2 * spread[k], and the vertices come back in reverse x order.
  const double s0 = v[5].second - v[0].second, s1 = v[4].second - v[1].second;
  EXPECT_NEAR(s0 / s1, 0.5 / 0.25, 1e-3);
  EXPECT_EQ(v[0].first, v[5].first);
  EXPECT_EQ(v[2].first, v[3].first);
  EXPECT_LT(v[0].first, v[2].first);
}

TEST(StudyPartialPi, KeepsTheHighestFrequencyPairsAndInterpolatesTheRest) {
  RopeParams base;
  base.head_dim = base.rotary_dim = 16;
  base.max_position_embeddings = 64;
  const int n = 8;
  const double s = 4;
  const auto plain = ComputeFrequencies(ScaledRope(base, "none", 1, 64), Numerics::kExact, 256);
  for (int keep : {0, 3, n}) {
    const auto f = ComputeFrequencies(PartialPi(base, keep, s, 64), Numerics::kExact, 256);
    EXPECT_EQ(f.attention_factor, 1.0);
    for (int j = 0; j < n; ++j) {
      // theta_j = base^(-2j/R) (pair 0 has the highest frequency); PI divides it by s.
      const double theta = std::pow(10000.0, -2.0 * j / 16);
      const double want = j < keep ? theta : theta / s;
      EXPECT_NEAR(f.inv_freq[j], want, 1e-15 * theta) << keep << " " << j;
      if (j < keep) {
        EXPECT_EQ(f.inv_freq[j], plain.inv_freq[j]);
      }
    }
  }
  EXPECT_THROW(PartialPi(base, n + 1, s, 64), Error);
}

}  // namespace
}  // namespace ropekit::study
