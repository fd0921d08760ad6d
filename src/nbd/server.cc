#include "nbd/server.h"

#include <sys/stat.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/format.h>

#include "nbd/session.h"
#include "util/logging.h"

namespace blockrelay::nbd {
namespace {
constexpr auto kTuple = asio::experimental::as_tuple(asio::use_awaitable);
}

Status BindUnixAcceptor(asio::local::stream_protocol::acceptor& acceptor,
                        const std::filesystem::path& path, int mode) {
  std::error_code fs_ec;
  if (std::filesystem::is_socket(path, fs_ec)) {
    // A socket file is left behind by a process that died. Refuse only if
    // something still answers on it.
    asio::local::stream_protocol::socket probe(acceptor.get_executor());
    asio::error_code ec;
    probe.connect(asio::local::stream_protocol::endpoint(path.string()), ec);
    if (!ec) {
      return Status::Busy(fmt::format(
          "{} is in use by a running process; is another blockrelay running "
          "with this config?",
          path.string()));
    }
    std::filesystem::remove(path, fs_ec);
  } else if (std::filesystem::exists(path, fs_ec)) {
    return Status::InvalidArgument(fmt::format(
        "{} exists and is not a socket; refusing to replace it", path.string()));
  }
  asio::error_code ec;
  asio::local::stream_protocol::endpoint endpoint(path.string());
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return Status::IOError(
        fmt::format("listen on {}: {}", path.string(), ec.message()),
        ec.value());
  }
  if (::chmod(path.c_str(), static_cast<mode_t>(mode)) != 0) {
    return PosixError(fmt::format("chmod {}", path.string()), errno);
  }
  return Status::OK();
}

Server::Server(asio::io_context& ctx, const VolumeCatalog& catalog,
               core::IoExecutor& io)
    : ctx_(ctx), catalog_(catalog), io_(io), sessions_changed_(ctx) {
  sessions_changed_.expires_at(asio::steady_timer::time_point::max());
}

Server::~Server() {
  if (!unix_path_.empty()) {
    std::error_code ec;
    std::filesystem::remove(unix_path_, ec);
  }
}

Status Server::Listen(const config::NbdConfig& config) {
  if (config.unix_socket) {
    unix_acceptor_.emplace(ctx_);
    Status s = BindUnixAcceptor(*unix_acceptor_, *config.unix_socket, 0660);
    if (!s.ok()) return s.WithContext("nbd.unix_socket");
    unix_path_ = *config.unix_socket;
  }
  if (config.listen) {
    asio::error_code ec;
    asio::ip::tcp::resolver resolver(ctx_);
    auto results = resolver.resolve(config.listen->host,
                                    std::to_string(config.listen->port), ec);
    if (ec || results.empty()) {
      return Status::InvalidArgument(fmt::format(
          "nbd.listen: cannot resolve {}: {}", config.listen->ToString(),
          ec ? ec.message() : "no address"));
    }
    auto endpoint = results.begin()->endpoint();
    tcp_acceptor_.emplace(ctx_);
    tcp_acceptor_->open(endpoint.protocol(), ec);
    if (!ec) tcp_acceptor_->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) tcp_acceptor_->bind(endpoint, ec);
    if (!ec) tcp_acceptor_->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return Status::IOError(fmt::format("nbd.listen: listen on {}: {}",
                                         config.listen->ToString(),
                                         ec.message()),
                             ec.value());
    }
  }
  return Status::OK();
}

std::optional<std::string> Server::tcp_endpoint() const {
  if (!tcp_acceptor_) return std::nullopt;
  asio::error_code ec;
  auto ep = tcp_acceptor_->local_endpoint(ec);
  if (ec) return std::nullopt;
  return fmt::format("{}:{}", ep.address().to_string(), ep.port());
}

void Server::Start() {
  if (unix_acceptor_) {
    asio::co_spawn(ctx_, AcceptLoop(*unix_acceptor_, "unix"), asio::detached);
  }
  if (tcp_acceptor_) {
    asio::co_spawn(ctx_, AcceptLoop(*tcp_acceptor_, "tcp"), asio::detached);
  }
}

template <typename Acceptor>
asio::awaitable<void> Server::AcceptLoop(Acceptor& acceptor, std::string kind) {
  while (!stopping_) {
    auto [ec, socket] = co_await acceptor.async_accept(kTuple);
    if (ec) {
      if (ec == asio::error::operation_aborted || stopping_) break;
      // EMFILE and friends: log, back off briefly, keep serving the others.
      BR_LOG_WARN("nbd", "accept on {} failed: {}", kind, ec.message());
      asio::steady_timer pause(ctx_, std::chrono::milliseconds(100));
      co_await pause.async_wait(kTuple);
      continue;
    }
    // Big socket buffers let a 1 MiB READ reply or WRITE payload cross in
    // few system calls (the kernel caps them at net.core.*mem_max).
    asio::error_code opt_ec;
    socket.set_option(asio::socket_base::send_buffer_size(4 << 20), opt_ec);
    socket.set_option(asio::socket_base::receive_buffer_size(4 << 20), opt_ec);
    std::string peer = kind;
    if constexpr (std::is_same_v<Acceptor, asio::ip::tcp::acceptor>) {
      socket.set_option(asio::ip::tcp::no_delay(true), opt_ec);
      auto remote = socket.remote_endpoint(opt_ec);
      if (!opt_ec) {
        peer = fmt::format("{}:{}", remote.address().to_string(), remote.port());
      }
    }
    StartSession(asio::generic::stream_protocol::socket(std::move(socket)),
                 std::move(peer));
  }
}

void Server::StartSession(asio::generic::stream_protocol::socket socket,
                          std::string peer) {
  uint64_t id = next_session_id_++;
  auto session = std::make_shared<Session>(std::move(socket), catalog_, io_, id,
                                           std::move(peer));
  sessions_[id] = session;
  asio::co_spawn(ctx_, session->Run(),
                 [this, id, session](std::exception_ptr e) {
                   if (e) {
                     try {
                       std::rethrow_exception(e);
                     } catch (const std::exception& ex) {
                       BR_LOG_ERROR("nbd", "client {} ended with an error: {}",
                                    id, ex.what());
                     }
                   }
                   sessions_.erase(id);
                   sessions_changed_.cancel();
                 });
}

asio::awaitable<void> Server::Shutdown() {
  stopping_ = true;
  asio::error_code ec;
  if (unix_acceptor_) unix_acceptor_->close(ec);
  if (tcp_acceptor_) tcp_acceptor_->close(ec);
  for (auto& [id, weak] : sessions_) {
    if (auto s = weak.lock()) s->RequestStop();
  }
  // Sessions finish their requests and send the replies. A client that does
  // not read its replies would hold us forever: after a grace period the
  // remaining sessions are cut (their requests still complete on disk).
  constexpr auto kGracePeriod = std::chrono::seconds(10);
  auto deadline = std::chrono::steady_clock::now() + kGracePeriod;
  bool aborted = false;
  while (!sessions_.empty()) {
    if (!aborted && std::chrono::steady_clock::now() >= deadline) {
      BR_LOG_WARN("nbd", "{} client(s) still not done {} s after shutdown "
                  "began; disconnecting them",
                  sessions_.size(), kGracePeriod.count());
      for (auto& [id, weak] : sessions_) {
        if (auto s = weak.lock()) s->Abort();
      }
      aborted = true;
    }
    sessions_changed_.expires_at(aborted ? asio::steady_timer::time_point::max()
                                         : deadline);
    co_await sessions_changed_.async_wait(kTuple);
  }
}

}  // namespace blockrelay::nbd
