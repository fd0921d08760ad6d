// Reading and writing replication frames on a stream.
//
// The transport is a plain TCP socket today; everything that touches it
// goes through these helpers and the Stream alias, so TLS (an
// asio::ssl::stream over the socket) can wrap it later in one place.
//
// One coroutine reads a stream and one writes it (each link and each
// receiver connection has exactly one of each); both run on the network
// thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <asio/awaitable.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>

#include "blockrelay/status.h"
#include "replication/protocol.h"

namespace blockrelay::replication {

using Stream = asio::ip::tcp::socket;

struct ReceivedFrame {
  FrameHeader header;
  Bytes bytes;  // header + payload
  std::span<const std::byte> header_bytes() const {
    return std::span<const std::byte>(bytes).first(kFrameHeaderBytes);
  }
  std::span<const std::byte> payload() const {
    return std::span<const std::byte>(bytes).subspan(kFrameHeaderBytes);
  }
  Result<Frame> Decode() const { return DecodeFrame(header, header_bytes(), payload()); }
};

// Reads one whole frame. IOError on EOF or a socket error (naming `peer`);
// the codec's error for a bad header (the payload is then not read: the
// stream cannot be trusted any more and the caller closes it).
asio::awaitable<Result<ReceivedFrame>> ReadFrame(Stream& stream,
                                                 const std::string& peer);

// Reads frames from a stream through a buffer, so that the small frames
// of a busy link (acknowledgements, small write groups) cost one read
// system call for many rather than two each.
class FrameReader {
 public:
  FrameReader(Stream& stream, std::string peer)
      : stream_(stream), peer_(std::move(peer)), buffer_(kBufferBytes) {}
  // As ReadFrame().
  asio::awaitable<Result<ReceivedFrame>> Next();

 private:
  static constexpr size_t kBufferBytes = 256u << 10;
  // Reads at least one more byte into the buffer (moving what is left to
  // the front first). IOError on EOF or error.
  asio::awaitable<Status> Fill();
  Stream& stream_;
  const std::string peer_;
  Bytes buffer_;
  size_t begin_ = 0, end_ = 0;
};

// Writes all of `bytes`. IOError naming `peer` on failure.
asio::awaitable<Status> WriteFrameBytes(Stream& stream, const Bytes& bytes,
                                        const std::string& peer);

// Writes the pieces of frames encoded for a gathering write (protocol.h,
// FramePiece) in order, `out` holding the pieces that are not data views.
// IOError naming `peer` on failure.
asio::awaitable<Status> WriteFramePieces(Stream& stream, const Bytes& out,
                                         const std::vector<FramePiece>& pieces,
                                         const std::string& peer);

// Closes a stream when a deadline passes: one for keepalive and handshake
// timeouts, rearmed with Arm() whenever the peer shows life.
class Watchdog {
 public:
  Watchdog(Stream& stream, std::chrono::milliseconds timeout);
  ~Watchdog();
  void Arm();
  void Disarm();
  bool fired() const { return state_->fired; }

 private:
  // Shared with the timer's handler, which may run after a rearm or after
  // the watchdog is gone: it acts only for the current generation.
  struct State {
    Stream* stream;
    uint64_t generation = 0;
    bool fired = false;
  };
  std::chrono::milliseconds timeout_;
  asio::steady_timer timer_;
  std::shared_ptr<State> state_;
};

// "host:port" of the remote end, or "?" when unknown.
std::string PeerName(const Stream& stream);

}  // namespace blockrelay::replication
