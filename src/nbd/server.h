// Server: accepts NBD clients on a Unix socket and/or TCP and runs one
// Session per connection.
//
// Executor rule: constructed, started and stopped on the io_context thread
// that runs it; sessions live on the same thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <asio/awaitable.hpp>
#include <asio/generic/stream_protocol.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/steady_timer.hpp>

#include "blockrelay/config/site_config.h"
#include "blockrelay/core/io_executor.h"
#include "blockrelay/status.h"
#include "nbd/volume_catalog.h"

namespace blockrelay::nbd {

class Session;

class Server {
 public:
  Server(asio::io_context& ctx, const VolumeCatalog& catalog,
         core::IoExecutor& io);
  ~Server();

  // Binds the configured listeners. A stale Unix socket file (no process
  // listening on it) is replaced; a live one is refused.
  Status Listen(const config::NbdConfig& config);

  // Starts accepting. REQUIRES: Listen() returned OK.
  void Start();

  // Stops accepting, asks every session to finish its requests in flight and
  // completes once all sessions have closed.
  asio::awaitable<void> Shutdown();

  size_t session_count() const { return sessions_.size(); }
  // "127.0.0.1:10809" as bound (the port is real when 0 was configured).
  std::optional<std::string> tcp_endpoint() const;

 private:
  template <typename Acceptor>
  asio::awaitable<void> AcceptLoop(Acceptor& acceptor, std::string kind);
  void StartSession(asio::generic::stream_protocol::socket socket,
                    std::string peer);

  asio::io_context& ctx_;
  const VolumeCatalog& catalog_;
  core::IoExecutor& io_;
  std::optional<asio::local::stream_protocol::acceptor> unix_acceptor_;
  std::optional<asio::ip::tcp::acceptor> tcp_acceptor_;
  std::filesystem::path unix_path_;
  std::map<uint64_t, std::weak_ptr<Session>> sessions_;
  uint64_t next_session_id_ = 1;
  bool stopping_ = false;
  asio::steady_timer sessions_changed_;
};

// Binds a Unix stream acceptor at `path`, replacing a stale socket file.
// Shared by the NBD and control servers.
Status BindUnixAcceptor(asio::local::stream_protocol::acceptor& acceptor,
                        const std::filesystem::path& path, int mode);

}  // namespace blockrelay::nbd
