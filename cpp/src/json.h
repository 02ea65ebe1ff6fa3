#pragma once
// A strict, minimal JSON reader for the header of a safetensors file: objects,
// arrays, strings (with escapes), integers and the literals. Numbers with a
// fraction or exponent and nesting deeper than 64 levels are refused; keys keep
// their file order. Internal to dora_ext (not installed).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dora_ext::json {

struct Value {
  enum class Kind { Null, Bool, Integer, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;

  // The member `key` of an object, or nullptr.
  const Value* find(const std::string& key) const;
};

// Parses `text` (one JSON value, surrounding whitespace allowed). Errors throw
// c10::Error naming `what` and the byte offset.
Value parse(const std::string& text, const std::string& what);

// `s` as a JSON string literal, quotes included.
std::string quote(const std::string& s);

}  // namespace dora_ext::json
