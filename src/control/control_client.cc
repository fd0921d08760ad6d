#include "blockrelay/control/control_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include <fmt/format.h>

namespace blockrelay::control {
namespace {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// Waits for `events` on fd until `deadline`; false on timeout or error.
Status WaitFor(int fd, short events,
               std::chrono::steady_clock::time_point deadline,
               const std::string& what) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Status::IOError(fmt::format("timed out {}", what), ETIMEDOUT);
    }
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left.count()));
    if (rc > 0) return Status::OK();
    if (rc < 0 && errno != EINTR) return PosixError("poll " + what, errno);
  }
}

}  // namespace

Result<nlohmann::json> Call(const std::filesystem::path& socket_path,
                            const nlohmann::json& request,
                            std::chrono::milliseconds timeout) {
  const std::string path = socket_path.string();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(
        fmt::format("control socket path {} is too long", path));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return PosixError("socket", errno);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int err = errno;
    std::string hint = (err == ENOENT || err == ECONNREFUSED)
                           ? " (is the blockrelay daemon running?)"
                           : "";
    return Status::IOError(fmt::format("connect to control socket {}: {}{}",
                                       path, std::strerror(err), hint),
                           err);
  }
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string line = request.dump() + "\n";
  size_t sent = 0;
  while (sent < line.size()) {
    Status s = WaitFor(fd.get(), POLLOUT, deadline, "sending to " + path);
    if (!s.ok()) return s;
    ssize_t n = ::send(fd.get(), line.data() + sent, line.size() - sent,
                       MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return PosixError("send to " + path, errno);
    }
    sent += static_cast<size_t>(n);
  }
  std::string reply;
  char buf[65536];
  for (;;) {
    auto nl = reply.find('\n');
    if (nl != std::string::npos) {
      reply.resize(nl);
      break;
    }
    Status s = WaitFor(fd.get(), POLLIN, deadline, "waiting for " + path);
    if (!s.ok()) return s;
    ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return PosixError("recv from " + path, errno);
    }
    if (n == 0) {
      return Status::IOError(
          fmt::format("control socket {} closed before replying", path));
    }
    reply.append(buf, static_cast<size_t>(n));
  }
  auto parsed = nlohmann::json::parse(reply, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    return Status::Corruption(
        fmt::format("control socket {} sent a reply that is not a JSON object",
                    path));
  }
  return parsed;
}

}  // namespace blockrelay::control
