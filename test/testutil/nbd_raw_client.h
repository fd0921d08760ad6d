// RawNbdClient: an NBD client that speaks the wire bytes by hand, for tests
// that must send what libnbd refuses to send (bad magic, unknown options and
// commands, oversized requests, a WRITE cut off half way) and watch exactly
// what the server answers.
//
// Built on the pure codec in src/nbd/protocol.h. Every read and write has a
// deadline, so a server that goes quiet fails the test instead of hanging
// it. Blocking; one thread per client.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "blockrelay/status.h"
#include "nbd/protocol.h"

namespace blockrelay::testutil {

inline constexpr std::chrono::milliseconds kRawTimeout{5000};

// A connected stream socket with deadline-bounded I/O. Move-only.
class RawSocket {
 public:
  static Result<RawSocket> ConnectUnix(const std::filesystem::path& path);
  static Result<RawSocket> ConnectTcp(uint16_t port);  // 127.0.0.1

  RawSocket(RawSocket&& other) noexcept;
  RawSocket& operator=(RawSocket&& other) noexcept;
  ~RawSocket();

  // Sends every byte (MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE).
  Status SendAll(std::span<const std::byte> bytes,
                 std::chrono::milliseconds timeout = kRawTimeout);
  Status SendAll(const std::string& text,
                 std::chrono::milliseconds timeout = kRawTimeout);
  // Exactly `n` bytes; IOError when the peer closes first or on timeout.
  Result<nbd::Bytes> ReadExact(size_t n,
                               std::chrono::milliseconds timeout = kRawTimeout);
  // Whatever arrives until the peer closes or `timeout` passes; sets
  // `closed` to whether the peer closed (EOF or reset).
  nbd::Bytes ReadUntilClose(bool* closed,
                            std::chrono::milliseconds timeout = kRawTimeout);
  // True when the peer closes within `timeout` (data before EOF is dropped).
  bool WaitForClose(std::chrono::milliseconds timeout = kRawTimeout);
  void Close();
  int fd() const { return fd_; }

 private:
  explicit RawSocket(int fd) : fd_(fd) {}
  int fd_ = -1;
};

class RawNbdClient {
 public:
  struct OptionReply {
    uint32_t option = 0;
    uint32_t type = 0;
    nbd::Bytes payload;
  };
  struct GoResult {
    uint64_t size_bytes = 0;
    uint16_t transmission_flags = 0;
  };
  struct SimpleReply {
    uint32_t error = 0;
    uint64_t cookie = 0;
  };

  // Connects, checks the greeting and sends `client_flags`.
  static Result<RawNbdClient> Connect(
      const std::filesystem::path& unix_socket,
      uint32_t client_flags = nbd::kClientFlagFixedNewstyle |
                              nbd::kClientFlagNoZeroes);
  static Result<RawNbdClient> ConnectTcp(
      uint16_t port, uint32_t client_flags = nbd::kClientFlagFixedNewstyle |
                                              nbd::kClientFlagNoZeroes);

  uint16_t handshake_flags() const { return handshake_flags_; }
  RawSocket& socket() { return socket_; }

  // --- Option haggling ---
  Status SendOption(uint32_t option, std::span<const std::byte> payload = {});
  Result<OptionReply> ReadOptionReply();
  // Replies up to and including the final one (ACK or an error reply).
  Result<std::vector<OptionReply>> ReadOptionReplies();
  // NBD_OPT_GO for `name` with no info requests; enters transmission. An
  // error reply becomes a NotFound Status naming the reply type.
  Result<GoResult> Go(const std::string& name = "");
  // NBD_OPT_EXPORT_NAME; reads the 10-byte reply (the client set NO_ZEROES).
  Result<GoResult> ExportName(const std::string& name);

  // --- Transmission ---
  Status SendRequest(const nbd::Request& r,
                     std::span<const std::byte> payload = {});
  // A simple reply header (the payload of a READ is the caller's to read).
  Result<SimpleReply> ReadSimpleReply(
      std::chrono::milliseconds timeout = kRawTimeout);

 private:
  explicit RawNbdClient(RawSocket socket) : socket_(std::move(socket)) {}
  static Result<RawNbdClient> Greet(RawSocket socket, uint32_t client_flags);

  RawSocket socket_;
  uint16_t handshake_flags_ = 0;
};

// NBD_OPT_INFO / NBD_OPT_GO payload: u32 namelen, name, u16 n, n x u16.
nbd::Bytes InfoPayload(const std::string& name,
                       const std::vector<uint16_t>& info_types = {});
// LIST/SET_META_CONTEXT payload: u32 namelen, name, u32 n, {u32 len, query}.
nbd::Bytes MetaContextPayload(const std::string& name,
                              const std::vector<std::string>& queries);
// Bytes of a string, for payloads.
nbd::Bytes ToBytes(std::string_view s);

}  // namespace blockrelay::testutil
