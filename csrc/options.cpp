#include "options.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>

namespace dora_ext {
namespace {

enum OptionId { kTier, kNormCache, kDecodeMaxTokens, kFp32PartsMinTokens, kSavedActivation, kOptionCount };

struct OptionSpec {
  const char* name;
  const char* env;
};
constexpr OptionSpec kSpecs[kOptionCount] = {{"tier", "DORA_EXT_TIER"},
                                             {"norm_cache", "DORA_EXT_NORM_CACHE"},
                                             {"decode_max_tokens", "DORA_EXT_DECODE_MAX_TOKENS"},
                                             {"fp32_parts_min_tokens", "DORA_EXT_FP32_PARTS_MIN_TOKENS"},
                                             {"saved_activation", "DORA_EXT_SAVED_ACTIVATION"}};
constexpr const char* kTierNames[] = {"auto", "eager", "fused", "prefer_fused"};
constexpr const char* kSavedActivationNames[] = {"output", "z", "recompute"};

OptionId option_id(const std::string& name) {
  for (int id = 0; id < kOptionCount; ++id) {
    if (name == kSpecs[id].name) return static_cast<OptionId>(id);
  }
  TORCH_CHECK(false, "dora_ext: unknown option '", name,
              "'; the options are tier, norm_cache, decode_max_tokens, fp32_parts_min_tokens and saved_activation");
}

int64_t parse_count(const std::string& value, const char* source) {
  char* end = nullptr;
  const long long parsed = std::strtoll(value.c_str(), &end, 10);
  TORCH_CHECK(!value.empty() && *end == '\0' && parsed >= 0, source, " must be a non-negative integer, got '", value,
              "'");
  return parsed;
}

// Sets option `id` of `options` from its spelling; `source` names where the value came from.
void assign(Options& options, OptionId id, const std::string& value, const char* source) {
  switch (id) {
    case kTier:
      for (int i = 0; i < 4; ++i) {
        if (value == kTierNames[i]) {
          options.tier = static_cast<TierOverride>(i);
          return;
        }
      }
      TORCH_CHECK(false, source, " must be 'auto', 'eager', 'fused' or 'prefer_fused', got '", value, "'");
    case kNormCache:
      TORCH_CHECK(value == "0" || value == "1", source, " must be 0 or 1, got '", value, "'");
      options.norm_cache = value == "1";
      return;
    case kDecodeMaxTokens:
      options.decode_max_tokens = parse_count(value, source);
      return;
    case kFp32PartsMinTokens:
      options.fp32_parts_min_tokens = parse_count(value, source);
      return;
    case kSavedActivation:
      for (int i = 0; i < 3; ++i) {
        if (value == kSavedActivationNames[i]) {
          options.saved_activation = static_cast<SavedActivation>(i);
          return;
        }
      }
      TORCH_CHECK(false, source, " must be 'output', 'z' or 'recompute', got '", value, "'");
    case kOptionCount:
      break;
  }
}

std::string spell(const Options& options, OptionId id) {
  switch (id) {
    case kTier:
      return kTierNames[static_cast<int>(options.tier)];
    case kNormCache:
      return options.norm_cache ? "1" : "0";
    case kDecodeMaxTokens:
      return std::to_string(options.decode_max_tokens);
    case kFp32PartsMinTokens:
      return std::to_string(options.fp32_parts_min_tokens);
    case kSavedActivation:
      return kSavedActivationNames[static_cast<int>(options.saved_activation)];
    case kOptionCount:
      break;
  }
  return "";
}

// to.<id> = from.<id> (on every op call under a thread override: no string round trip)
void copy_option(Options& to, const Options& from, OptionId id) {
  switch (id) {
    case kTier:
      to.tier = from.tier;
      return;
    case kNormCache:
      to.norm_cache = from.norm_cache;
      return;
    case kDecodeMaxTokens:
      to.decode_max_tokens = from.decode_max_tokens;
      return;
    case kFp32PartsMinTokens:
      to.fp32_parts_min_tokens = from.fp32_parts_min_tokens;
      return;
    case kSavedActivation:
      to.saved_activation = from.saved_activation;
      return;
    case kOptionCount:
      break;
  }
}

struct Process {
  std::mutex mutex;
  bool loaded = false;  // read from the environment
  Options options;
};

Process& process() {
  static Process p;
  return p;
}

// The caller holds the lock. A malformed variable raises, naming it, on every use until
// set_option gives that option a value.
void load_environment_locked(Process& p) {
  if (p.loaded) return;
  Options from_env;
  for (int id = 0; id < kOptionCount; ++id) {
    const char* env = std::getenv(kSpecs[id].env);
    if (env != nullptr && *env != '\0') assign(from_env, static_cast<OptionId>(id), env, kSpecs[id].env);
  }
  p.options = from_env;
  p.loaded = true;
}

thread_local OptionOverrides thread_overrides;

}  // namespace

Options current_options() {
  Process& p = process();
  Options options;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    load_environment_locked(p);
    options = p.options;
  }
  for (int id = 0; id < kOptionCount; ++id) {
    if (thread_overrides.set[id]) copy_option(options, thread_overrides.values, static_cast<OptionId>(id));
  }
  return options;
}

void set_option(const std::string& name, const std::string& value) {
  const OptionId id = option_id(name);
  Process& p = process();
  std::lock_guard<std::mutex> lock(p.mutex);
  Options updated = p.options;
  if (!p.loaded) {
    // The other options still come from the environment; a malformed variable of this one
    // is what this call replaces.
    for (int other = 0; other < kOptionCount; ++other) {
      const char* env = std::getenv(kSpecs[other].env);
      if (other != id && env != nullptr && *env != '\0') {
        assign(updated, static_cast<OptionId>(other), env, kSpecs[other].env);
      }
    }
  }
  assign(updated, id, value, name.c_str());
  p.options = updated;
  p.loaded = true;
}

std::string get_option(const std::string& name) {
  return spell(current_options(), option_id(name));
}

std::optional<std::string> thread_option(const std::string& name) {
  const OptionId id = option_id(name);
  if (!thread_overrides.set[id]) return std::nullopt;
  return spell(thread_overrides.values, id);
}

void set_thread_option(const std::string& name, const std::optional<std::string>& value) {
  const OptionId id = option_id(name);
  if (value) assign(thread_overrides.values, id, *value, name.c_str());
  thread_overrides.set[id] = value.has_value();
}

ThreadOptionsGuard::ThreadOptionsGuard(const Options& options) : previous_(thread_overrides) {
  thread_overrides.values = options;
  thread_overrides.set.fill(true);
}

ThreadOptionsGuard::~ThreadOptionsGuard() {
  thread_overrides = previous_;
}

}  // namespace dora_ext
