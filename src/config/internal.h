// Helpers shared by the config module's .cc files; not part of the API.
#pragma once

#include <string>
#include <string_view>

namespace blockrelay::config {

// `text` as a JSON string literal for error messages: quoted, escaped,
// invalid UTF-8 replaced, cut after 80 bytes with "...".
std::string QuoteForMessage(std::string_view text);

}  // namespace blockrelay::config
