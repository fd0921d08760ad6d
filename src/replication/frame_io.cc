#include "replication/frame_io.h"

#include <cstring>

#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <fmt/format.h>

namespace blockrelay::replication {

namespace {
constexpr auto kAsTuple = asio::experimental::as_tuple(asio::use_awaitable);
}

asio::awaitable<Result<ReceivedFrame>> ReadFrame(Stream& stream,
                                                 const std::string& peer) {
  ReceivedFrame frame;
  frame.bytes.resize(kFrameHeaderBytes);
  auto [ec, n] = co_await asio::async_read(
      stream, asio::buffer(frame.bytes.data(), kFrameHeaderBytes), kAsTuple);
  if (ec) {
    co_return Status::IOError(
        ec == asio::error::eof
            ? fmt::format("{} closed the connection", peer)
            : fmt::format("reading from {}: {}", peer, ec.message()),
        ec.value());
  }
  auto header = DecodeFrameHeader(frame.header_bytes());
  if (!header.ok()) {
    co_return header.status().WithContext(fmt::format("frame from {}", peer));
  }
  frame.header = *header;
  frame.bytes.resize(kFrameHeaderBytes + frame.header.length);
  if (frame.header.length > 0) {
    auto [ec2, n2] = co_await asio::async_read(
        stream,
        asio::buffer(frame.bytes.data() + kFrameHeaderBytes, frame.header.length),
        kAsTuple);
    if (ec2) {
      co_return Status::IOError(
          fmt::format("reading a {}-byte {} frame from {}: {}",
                      frame.header.length, FrameTypeName(frame.header.type),
                      peer, ec2.message()),
          ec2.value());
    }
  }
  co_return frame;
}

asio::awaitable<Status> FrameReader::Fill() {
  if (begin_ == end_) {
    // Everything read so far is handled. What handling it queued on this
    // thread (an acknowledgement to send, a reply to a client) goes first:
    // the read below usually finds nothing yet and would delay it by a
    // system call.
    co_await asio::post(stream_.get_executor(), asio::use_awaitable);
  }
  if (begin_ > 0) {
    std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  auto [ec, n] = co_await stream_.async_read_some(
      asio::buffer(buffer_.data() + end_, buffer_.size() - end_), kAsTuple);
  if (ec) {
    co_return Status::IOError(
        ec == asio::error::eof
            ? fmt::format("{} closed the connection", peer_)
            : fmt::format("reading from {}: {}", peer_, ec.message()),
        ec.value());
  }
  end_ += n;
  co_return Status::OK();
}

asio::awaitable<Result<ReceivedFrame>> FrameReader::Next() {
  while (end_ - begin_ < kFrameHeaderBytes) {
    if (Status s = co_await Fill(); !s.ok()) co_return s;
  }
  ReceivedFrame frame;
  auto header = DecodeFrameHeader(
      std::span<const std::byte>(buffer_).subspan(begin_, kFrameHeaderBytes));
  if (!header.ok()) {
    co_return header.status().WithContext(fmt::format("frame from {}", peer_));
  }
  frame.header = *header;
  const size_t total = kFrameHeaderBytes + frame.header.length;
  if (total <= buffer_.size()) {
    while (end_ - begin_ < total) {
      if (Status s = co_await Fill(); !s.ok()) co_return s;
    }
    frame.bytes.assign(buffer_.begin() + begin_, buffer_.begin() + begin_ + total);
    begin_ += total;
    co_return frame;
  }
  // Larger than the buffer: take what is buffered, read the rest directly.
  frame.bytes.resize(total);
  const size_t have = end_ - begin_;
  std::memcpy(frame.bytes.data(), buffer_.data() + begin_, have);
  begin_ = end_ = 0;
  auto [ec, n] = co_await asio::async_read(
      stream_, asio::buffer(frame.bytes.data() + have, total - have), kAsTuple);
  if (ec) {
    co_return Status::IOError(
        fmt::format("reading a {}-byte {} frame from {}: {}", frame.header.length,
                    FrameTypeName(frame.header.type), peer_, ec.message()),
        ec.value());
  }
  co_return frame;
}

asio::awaitable<Status> WriteFrameBytes(Stream& stream, const Bytes& bytes,
                                        const std::string& peer) {
  auto [ec, n] = co_await asio::async_write(
      stream, asio::buffer(bytes.data(), bytes.size()), kAsTuple);
  if (ec) {
    co_return Status::IOError(fmt::format("sending to {}: {}", peer, ec.message()),
                              ec.value());
  }
  co_return Status::OK();
}

asio::awaitable<Status> WriteFramePieces(Stream& stream, const Bytes& out,
                                         const std::vector<FramePiece>& pieces,
                                         const std::string& peer) {
  std::vector<asio::const_buffer> buffers;
  buffers.reserve(pieces.size());
  for (const FramePiece& p : pieces) {
    if (p.data.empty()) {
      buffers.emplace_back(out.data() + p.offset, p.size);
    } else {
      buffers.emplace_back(p.data.data(), p.data.size());
    }
  }
  auto [ec, n] = co_await asio::async_write(stream, buffers, kAsTuple);
  if (ec) {
    co_return Status::IOError(fmt::format("sending to {}: {}", peer, ec.message()),
                              ec.value());
  }
  co_return Status::OK();
}

Watchdog::Watchdog(Stream& stream, std::chrono::milliseconds timeout)
    : timeout_(timeout), timer_(stream.get_executor()),
      state_(std::make_shared<State>(State{&stream})) {}

Watchdog::~Watchdog() { Disarm(); }

void Watchdog::Arm() {
  const uint64_t generation = ++state_->generation;
  timer_.expires_after(timeout_);
  timer_.async_wait([state = state_, generation](std::error_code ec) {
    if (ec || state->generation != generation) return;
    state->fired = true;
    std::error_code ignored;
    state->stream->shutdown(asio::socket_base::shutdown_both, ignored);
    state->stream->close(ignored);
  });
}

void Watchdog::Disarm() {
  ++state_->generation;
  timer_.cancel();
}

std::string PeerName(const Stream& stream) {
  std::error_code ec;
  auto ep = stream.remote_endpoint(ec);
  if (ec) return "?";
  return fmt::format("{}:{}", ep.address().to_string(), ep.port());
}

}  // namespace blockrelay::replication
