// Renders the control API's status reply as aligned text for `blockrelay
// status`. Pure: JSON in, text out, so its layout is unit-tested.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace blockrelay::control {

// "1.5 GiB", "512 B".
std::string FormatBytes(uint64_t bytes);

// Columns padded to their widest cell, two spaces apart.
std::string FormatTable(const std::vector<std::vector<std::string>>& rows);

std::string FormatStatus(const nlohmann::json& status);

}  // namespace blockrelay::control
