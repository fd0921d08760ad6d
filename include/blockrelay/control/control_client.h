// Control client: one JSON request, one JSON reply, over the site's control
// socket. Used by the CLI; blocking, with a timeout so a wedged daemon turns
// into an error, never a hang.
#pragma once

#include <chrono>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "blockrelay/status.h"

namespace blockrelay::control {

Result<nlohmann::json> Call(const std::filesystem::path& socket_path,
                            const nlohmann::json& request,
                            std::chrono::milliseconds timeout);

}  // namespace blockrelay::control
