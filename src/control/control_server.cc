#include "control/control_server.h"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/read_until.hpp>
#include <asio/streambuf.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <fmt/format.h>

#include "nbd/server.h"
#include "util/logging.h"

namespace blockrelay::control {
namespace {
constexpr auto kTuple = asio::experimental::as_tuple(asio::use_awaitable);
}

nlohmann::json ErrorReply(const std::string& message) {
  return {{"ok", false}, {"error", message}};
}

ControlServer::ControlServer(asio::io_context& ctx, Handler handler)
    : ctx_(ctx), handler_(std::move(handler)) {}

ControlServer::~ControlServer() {
  if (!path_.empty()) {
    std::error_code ec;
    std::filesystem::remove(path_, ec);
  }
}

Status ControlServer::Listen(const std::filesystem::path& path) {
  acceptor_.emplace(ctx_);
  Status s = nbd::BindUnixAcceptor(*acceptor_, path, 0660);
  if (!s.ok()) return s.WithContext("control_socket");
  path_ = path;
  return Status::OK();
}

void ControlServer::Start() {
  asio::co_spawn(ctx_, AcceptLoop(), asio::detached);
}

void ControlServer::Stop() {
  stopping_ = true;
  asio::error_code ec;
  if (acceptor_) acceptor_->close(ec);
}

asio::awaitable<void> ControlServer::AcceptLoop() {
  while (!stopping_) {
    auto [ec, socket] = co_await acceptor_->async_accept(kTuple);
    if (ec) {
      if (ec == asio::error::operation_aborted || stopping_) break;
      BR_LOG_WARN("control", "accept failed: {}", ec.message());
      continue;
    }
    asio::co_spawn(ctx_, Serve(std::move(socket)), asio::detached);
  }
}

asio::awaitable<void> ControlServer::Serve(
    asio::local::stream_protocol::socket socket) {
  asio::streambuf buffer(kMaxLineBytes);
  for (;;) {
    auto [ec, n] = co_await asio::async_read_until(socket, buffer, '\n', kTuple);
    nlohmann::json reply;
    bool close_after = false;
    if (ec == asio::error::not_found) {
      reply = ErrorReply(fmt::format("request line longer than {} bytes",
                                     kMaxLineBytes));
      close_after = true;
    } else if (ec) {
      break;  // client closed
    } else {
      std::string line(asio::buffers_begin(buffer.data()),
                       asio::buffers_begin(buffer.data()) + n - 1);
      buffer.consume(n);
      auto request = nlohmann::json::parse(line, nullptr, false);
      if (request.is_discarded()) {
        reply = ErrorReply("request is not valid JSON");
      } else if (!request.is_object() || !request.contains("command") ||
                 !request["command"].is_string()) {
        reply = ErrorReply(
            "request must be a JSON object with a string \"command\"");
      } else {
        try {
          reply = co_await handler_(request);
        } catch (const std::exception& e) {
          reply = ErrorReply(fmt::format("internal error: {}", e.what()));
        }
        if (!reply.contains("ok")) reply["ok"] = true;
      }
    }
    std::string out = reply.dump(-1, ' ', false,
                                 nlohmann::json::error_handler_t::replace) + "\n";
    auto [wec, wn] = co_await asio::async_write(socket, asio::buffer(out), kTuple);
    if (wec || close_after) break;
  }
  asio::error_code ignored;
  socket.close(ignored);
}

}  // namespace blockrelay::control
