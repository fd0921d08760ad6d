// ControlServer: the site's local management API on a Unix socket.
//
// Protocol: each side sends one JSON object per line. A request has a
// "command" string and command-specific fields; every reply has "ok" (bool)
// and, when ok is false, "error" (a sentence). The server answers requests of
// one connection in order. Malformed input gets an error reply, never a
// hang: a line longer than kMaxLineBytes ends the connection after an error.
//
// Executor rule: runs on the site's io_context thread; the handler is called
// there and must not block.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>

#include <asio/awaitable.hpp>
#include <asio/io_context.hpp>
#include <asio/local/stream_protocol.hpp>
#include <nlohmann/json.hpp>

#include "blockrelay/status.h"

namespace blockrelay::control {

class ControlServer {
 public:
  // Returns the reply for one parsed request object (without "ok": the
  // server adds ok=true unless the handler set "ok" itself). It may run
  // asynchronously (e.g. `wait` commands).
  using Handler =
      std::function<asio::awaitable<nlohmann::json>(const nlohmann::json&)>;

  static constexpr size_t kMaxLineBytes = 1 << 20;

  ControlServer(asio::io_context& ctx, Handler handler);
  ~ControlServer();

  // Binds the socket with mode 0660, replacing a stale socket file.
  Status Listen(const std::filesystem::path& path);
  void Start();
  void Stop();

 private:
  asio::awaitable<void> AcceptLoop();
  asio::awaitable<void> Serve(asio::local::stream_protocol::socket socket);

  asio::io_context& ctx_;
  Handler handler_;
  std::optional<asio::local::stream_protocol::acceptor> acceptor_;
  std::filesystem::path path_;
  bool stopping_ = false;
};

// Builds {"ok": false, "error": message}.
nlohmann::json ErrorReply(const std::string& message);

}  // namespace blockrelay::control
