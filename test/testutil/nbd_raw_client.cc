#include "testutil/nbd_raw_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace blockrelay::testutil {
namespace {

using Clock = std::chrono::steady_clock;

// Waits for `events`; OK when ready, IOError on timeout.
Status WaitReady(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    if (left.count() <= 0) return Status::IOError("timed out", ETIMEDOUT);
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left.count()));
    if (rc > 0) return Status::OK();
    if (rc < 0 && errno != EINTR) return PosixError("poll", errno);
  }
}

}  // namespace

Result<RawSocket> RawSocket::ConnectUnix(const std::filesystem::path& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string p = path.string();
  if (p.size() >= sizeof addr.sun_path) {
    return Status::InvalidArgument("socket path too long: " + p);
  }
  std::memcpy(addr.sun_path, p.c_str(), p.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return PosixError("socket", errno);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    Status s = PosixError("connect " + p, errno);
    ::close(fd);
    return s;
  }
  return RawSocket(fd);
}

Result<RawSocket> RawSocket::ConnectTcp(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return PosixError("socket", errno);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    Status s = PosixError(fmt::format("connect 127.0.0.1:{}", port), errno);
    ::close(fd);
    return s;
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return RawSocket(fd);
}

RawSocket::RawSocket(RawSocket&& other) noexcept : fd_(other.fd_) {
  other.fd_ = -1;
}

RawSocket& RawSocket::operator=(RawSocket&& other) noexcept {
  if (this != &other) {
    Close();
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

RawSocket::~RawSocket() { Close(); }

void RawSocket::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Status RawSocket::SendAll(std::span<const std::byte> bytes,
                          std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  size_t sent = 0;
  while (sent < bytes.size()) {
    if (Status s = WaitReady(fd_, POLLOUT, deadline); !s.ok()) {
      return s.WithContext(fmt::format("send ({} of {} bytes sent)", sent,
                                       bytes.size()));
    }
    ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return PosixError("send", errno);
    }
    sent += static_cast<size_t>(n);
  }
  return Status::OK();
}

Status RawSocket::SendAll(const std::string& text,
                          std::chrono::milliseconds timeout) {
  return SendAll(std::as_bytes(std::span(text.data(), text.size())), timeout);
}

Result<nbd::Bytes> RawSocket::ReadExact(size_t n,
                                        std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  nbd::Bytes out(n);
  size_t got = 0;
  while (got < n) {
    if (Status s = WaitReady(fd_, POLLIN, deadline); !s.ok()) {
      return s.WithContext(fmt::format("read ({} of {} bytes)", got, n));
    }
    ssize_t r = ::recv(fd_, out.data() + got, n - got, MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return PosixError("recv", errno);
    }
    if (r == 0) {
      return Status::IOError(
          fmt::format("peer closed after {} of {} bytes", got, n));
    }
    got += static_cast<size_t>(r);
  }
  return out;
}

nbd::Bytes RawSocket::ReadUntilClose(bool* closed,
                                     std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  nbd::Bytes out;
  *closed = false;
  std::byte buf[65536];
  for (;;) {
    if (!WaitReady(fd_, POLLIN, deadline).ok()) return out;
    ssize_t r = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      *closed = true;  // ECONNRESET and friends
      return out;
    }
    if (r == 0) {
      *closed = true;
      return out;
    }
    out.insert(out.end(), buf, buf + r);
  }
}

bool RawSocket::WaitForClose(std::chrono::milliseconds timeout) {
  bool closed = false;
  ReadUntilClose(&closed, timeout);
  return closed;
}

Result<RawNbdClient> RawNbdClient::Greet(RawSocket socket,
                                         uint32_t client_flags) {
  auto greeting = socket.ReadExact(18);
  if (!greeting.ok()) return greeting.status().WithContext("greeting");
  if (nbd::LoadBe64(greeting->data()) != nbd::kNbdMagic ||
      nbd::LoadBe64(greeting->data() + 8) != nbd::kIHaveOpt) {
    return Status::Corruption("greeting has the wrong magic");
  }
  uint16_t flags = nbd::LoadBe16(greeting->data() + 16);
  nbd::Bytes reply;
  nbd::AppendBe32(reply, client_flags);
  if (Status s = socket.SendAll(reply); !s.ok()) return s;
  RawNbdClient client(std::move(socket));
  client.handshake_flags_ = flags;
  return client;
}

Result<RawNbdClient> RawNbdClient::Connect(
    const std::filesystem::path& unix_socket, uint32_t client_flags) {
  auto socket = RawSocket::ConnectUnix(unix_socket);
  if (!socket.ok()) return socket.status();
  return Greet(std::move(socket).value(), client_flags);
}

Result<RawNbdClient> RawNbdClient::ConnectTcp(uint16_t port,
                                              uint32_t client_flags) {
  auto socket = RawSocket::ConnectTcp(port);
  if (!socket.ok()) return socket.status();
  return Greet(std::move(socket).value(), client_flags);
}

Status RawNbdClient::SendOption(uint32_t option,
                                std::span<const std::byte> payload) {
  nbd::Bytes out;
  nbd::AppendBe64(out, nbd::kIHaveOpt);
  nbd::AppendBe32(out, option);
  nbd::AppendBe32(out, static_cast<uint32_t>(payload.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return socket_.SendAll(out);
}

Result<RawNbdClient::OptionReply> RawNbdClient::ReadOptionReply() {
  auto header = socket_.ReadExact(20);
  if (!header.ok()) return header.status().WithContext("option reply");
  if (nbd::LoadBe64(header->data()) != nbd::kOptReplyMagic) {
    return Status::Corruption("option reply has the wrong magic");
  }
  OptionReply r;
  r.option = nbd::LoadBe32(header->data() + 8);
  r.type = nbd::LoadBe32(header->data() + 12);
  uint32_t length = nbd::LoadBe32(header->data() + 16);
  if (length > (1u << 20)) {
    return Status::Corruption(fmt::format("option reply of {} bytes", length));
  }
  auto payload = socket_.ReadExact(length);
  if (!payload.ok()) return payload.status().WithContext("option reply data");
  r.payload = std::move(payload).value();
  return r;
}

Result<std::vector<RawNbdClient::OptionReply>>
RawNbdClient::ReadOptionReplies() {
  std::vector<OptionReply> replies;
  for (;;) {
    auto r = ReadOptionReply();
    if (!r.ok()) return r.status();
    bool last = r->type == nbd::kRepAck || (r->type & nbd::kRepErrBit);
    replies.push_back(std::move(r).value());
    if (last) return replies;
  }
}

Result<RawNbdClient::GoResult> RawNbdClient::Go(const std::string& name) {
  if (Status s = SendOption(nbd::kOptGo, InfoPayload(name)); !s.ok()) return s;
  auto replies = ReadOptionReplies();
  if (!replies.ok()) return replies.status();
  const auto& last = replies->back();
  if (last.type != nbd::kRepAck) {
    return Status::NotFound(fmt::format("GO refused with reply type {:#x}",
                                        last.type));
  }
  for (const auto& r : *replies) {
    if (r.type == nbd::kRepInfo && r.payload.size() == 12 &&
        nbd::LoadBe16(r.payload.data()) == nbd::kInfoExport) {
      return GoResult{nbd::LoadBe64(r.payload.data() + 2),
                      nbd::LoadBe16(r.payload.data() + 10)};
    }
  }
  return Status::Corruption("GO succeeded without NBD_INFO_EXPORT");
}

Result<RawNbdClient::GoResult> RawNbdClient::ExportName(
    const std::string& name) {
  if (Status s = SendOption(nbd::kOptExportName, ToBytes(name)); !s.ok()) {
    return s;
  }
  auto reply = socket_.ReadExact(10);
  if (!reply.ok()) return reply.status().WithContext("EXPORT_NAME reply");
  return GoResult{nbd::LoadBe64(reply->data()),
                  nbd::LoadBe16(reply->data() + 8)};
}

Status RawNbdClient::SendRequest(const nbd::Request& r,
                                 std::span<const std::byte> payload) {
  nbd::Bytes out = nbd::EncodeRequest(r);
  out.insert(out.end(), payload.begin(), payload.end());
  return socket_.SendAll(out, std::chrono::seconds(20));
}

Result<RawNbdClient::SimpleReply> RawNbdClient::ReadSimpleReply(
    std::chrono::milliseconds timeout) {
  auto header = socket_.ReadExact(nbd::kSimpleReplyBytes, timeout);
  if (!header.ok()) return header.status().WithContext("simple reply");
  if (nbd::LoadBe32(header->data()) != nbd::kSimpleReplyMagic) {
    return Status::Corruption(fmt::format(
        "reply magic {:#x} is not the simple reply magic",
        nbd::LoadBe32(header->data())));
  }
  return SimpleReply{nbd::LoadBe32(header->data() + 4),
                     nbd::LoadBe64(header->data() + 8)};
}

nbd::Bytes InfoPayload(const std::string& name,
                       const std::vector<uint16_t>& info_types) {
  nbd::Bytes out;
  nbd::AppendBe32(out, static_cast<uint32_t>(name.size()));
  nbd::AppendBytes(out, name);
  nbd::AppendBe16(out, static_cast<uint16_t>(info_types.size()));
  for (uint16_t t : info_types) nbd::AppendBe16(out, t);
  return out;
}

nbd::Bytes MetaContextPayload(const std::string& name,
                              const std::vector<std::string>& queries) {
  nbd::Bytes out;
  nbd::AppendBe32(out, static_cast<uint32_t>(name.size()));
  nbd::AppendBytes(out, name);
  nbd::AppendBe32(out, static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) {
    nbd::AppendBe32(out, static_cast<uint32_t>(q.size()));
    nbd::AppendBytes(out, q);
  }
  return out;
}

nbd::Bytes ToBytes(std::string_view s) {
  nbd::Bytes out;
  nbd::AppendBytes(out, s);
  return out;
}

}  // namespace blockrelay::testutil
