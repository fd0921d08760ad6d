#include "nbd/session.h"

#include <algorithm>
#include <array>
#include <vector>

#include <asio/buffer.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/read.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include "nbd/volume_catalog.h"
#include "util/logging.h"

namespace blockrelay::nbd {
namespace {

constexpr auto kTuple = asio::experimental::as_tuple(asio::use_awaitable);

// Back-pressure: stop reading requests while this much is in flight, so a
// client pipelining huge writes cannot make us buffer without bound.
constexpr size_t kMaxInFlightRequests = 256;
constexpr size_t kMaxInFlightBytes = 256u << 20;

// Replies gathered into one write at most.
constexpr size_t kMaxBatchMessages = 64;

}  // namespace

Session::Session(Socket socket, const VolumeCatalog& catalog,
                 core::IoExecutor& io, uint64_t id, std::string peer)
    : socket_(std::move(socket)),
      catalog_(catalog),
      io_(io),
      id_(id),
      peer_(std::move(peer)),
      outbox_signal_(socket_.get_executor()),
      capacity_signal_(socket_.get_executor()) {
  outbox_signal_.expires_at(asio::steady_timer::time_point::max());
  capacity_signal_.expires_at(asio::steady_timer::time_point::max());
}

void Session::RequestStop() {
  if (stopping_) return;
  stopping_ = true;
  // Ends a pending read with EOF while letting replies still go out.
  asio::error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_receive, ec);
  if (!volume_) socket_.close(ec);  // still negotiating: nothing to finish
}

asio::awaitable<void> Session::Run() {
  auto self = shared_from_this();
  bool transmission = false;
  try {
    transmission = co_await Handshake();
  } catch (const std::exception& e) {
    // Allocation failure and the like: drop this client, keep the server.
    BR_LOG_ERROR("nbd", "client {} ({}): handshake failed: {}", id_, peer_,
                 e.what());
  }
  if (!transmission) {
    asio::error_code ec;
    socket_.close(ec);
    co_return;
  }
  volume_->AddClient();
  BR_LOG_INFO("nbd", "client {} ({}) attached to export {}{}", id_, peer_,
              volume_->name(), state_.read_only ? " (read-only)" : "");
  asio::co_spawn(socket_.get_executor(), WriteReplies(), asio::detached);
  co_await ReadRequests();

  // Reader ended (DISC, EOF, stop or a fatal client error): let requests in
  // flight finish and their replies go out, then close.
  stopping_ = true;
  while (in_flight_ > 0) {
    co_await capacity_signal_.async_wait(kTuple);
  }
  outbox_signal_.cancel();
  while (!writer_done_) {
    co_await capacity_signal_.async_wait(kTuple);
  }
  asio::error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_both, ec);
  socket_.close(ec);
  volume_->RemoveClient();
  BR_LOG_INFO("nbd", "client {} ({}) detached from export {}", id_, peer_,
              volume_->name());
}

asio::awaitable<bool> Session::Handshake() {
  auto greeting = EncodeGreeting(kFlagFixedNewstyle | kFlagNoZeroes);
  auto [ec, n] = co_await asio::async_write(socket_, asio::buffer(greeting),
                                            kTuple);
  if (ec) co_return false;
  std::array<std::byte, 4> flag_bytes;
  std::tie(ec, n) = co_await asio::async_read(socket_, asio::buffer(flag_bytes),
                                              kTuple);
  if (ec) co_return false;
  auto no_zeroes = CheckClientFlags(LoadBe32(flag_bytes.data()));
  if (!no_zeroes.ok()) {
    BR_LOG_WARN("nbd", "client {} ({}): {}; closing", id_, peer_,
                no_zeroes.status().message());
    co_return false;
  }
  Negotiator negotiator(catalog_, *no_zeroes);
  std::array<std::byte, kOptionHeaderBytes> header_bytes;
  Bytes payload;
  for (;;) {
    if (stopping_) co_return false;
    std::tie(ec, n) = co_await asio::async_read(
        socket_, asio::buffer(header_bytes), kTuple);
    if (ec) co_return false;  // client went away while negotiating
    auto header = DecodeOptionHeader(header_bytes);
    if (!header.ok()) {
      BR_LOG_WARN("nbd", "client {} ({}): {}; closing", id_, peer_,
                  header.status().message());
      co_return false;
    }
    Negotiator::Outcome outcome;
    if (header->length > kMaxOptionBytes) {
      if (!co_await Discard(header->length)) co_return false;
      outcome = negotiator.HandleOversizedOption(header->option, header->length);
    } else {
      payload.resize(header->length);
      std::tie(ec, n) = co_await asio::async_read(socket_, asio::buffer(payload),
                                                  kTuple);
      if (ec) co_return false;
      outcome = negotiator.HandleOption(header->option, payload);
    }
    if (!outcome.log.empty()) {
      BR_LOG_INFO("nbd", "client {} ({}): {}", id_, peer_, outcome.log);
    }
    if (stopping_ && outcome.next == Negotiator::Next::kEnterTransmission &&
        header->option != kOptExportName) {
      outcome.reply = EncodeOptionError(header->option, kRepErrShutdown,
                                        "server is shutting down");
      outcome.next = Negotiator::Next::kClose;
    }
    if (!outcome.reply.empty()) {
      std::tie(ec, n) = co_await asio::async_write(
          socket_, asio::buffer(outcome.reply), kTuple);
      if (ec) co_return false;
    }
    if (outcome.next == Negotiator::Next::kClose) co_return false;
    if (outcome.next == Negotiator::Next::kEnterTransmission) {
      const auto& e = negotiator.selected_export();
      volume_ = catalog_.FindVolume(e.name);
      state_.size_bytes = e.size_bytes;
      state_.read_only = e.read_only;
      state_.structured_replies = negotiator.structured_replies();
      state_.base_allocation = negotiator.base_allocation_selected();
      co_return volume_ != nullptr;
    }
  }
}

asio::awaitable<bool> Session::Discard(uint64_t length) {
  std::vector<std::byte> sink(std::min<uint64_t>(length, 1 << 20));
  while (length > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(length, sink.size()));
    auto [ec, n] = co_await asio::async_read(
        socket_, asio::buffer(sink.data(), chunk), kTuple);
    if (ec) co_return false;
    length -= n;
  }
  co_return true;
}

asio::awaitable<void> Session::ReadRequests() {
  std::array<std::byte, kRequestHeaderBytes> header_bytes;
  while (!stopping_ && !broken_) {
    while (in_flight_ >= kMaxInFlightRequests ||
           in_flight_bytes_ >= kMaxInFlightBytes) {
      co_await capacity_signal_.async_wait(kTuple);
      if (broken_) co_return;
    }
    auto [ec, n] = co_await asio::async_read(socket_, asio::buffer(header_bytes),
                                             kTuple);
    if (ec) {
      if (ec != asio::error::eof && ec != asio::error::operation_aborted &&
          ec != asio::error::connection_reset && !stopping_) {
        BR_LOG_WARN("nbd", "client {} ({}): read failed: {}", id_, peer_,
                    ec.message());
      } else if (ec == asio::error::eof && !stopping_) {
        BR_LOG_INFO("nbd", "client {} ({}) closed the connection without "
                    "NBD_CMD_DISC", id_, peer_);
      }
      co_return;
    }
    auto request = DecodeRequest(header_bytes);
    if (!request.ok()) {
      // Without valid magic the stream cannot be resynchronised: the spec
      // allows a hard disconnect, as nbdkit does.
      BR_LOG_WARN("nbd", "client {} ({}): {}; closing", id_, peer_,
                  request.status().message());
      co_return;
    }
    const Request& r = *request;
    auto rejection = ValidateRequest(r, state_);
    bool has_payload = r.type == static_cast<uint16_t>(Command::kWrite);
    if (rejection) {
      BR_LOG_INFO("nbd", "client {} ({}): {} refused: {}", id_, peer_,
                  CommandName(r.type), rejection->reason);
      // The payload of a refused WRITE is still on the wire.
      if (has_payload && !co_await Discard(r.length)) co_return;
      SendError(r, rejection->error, rejection->reason);
      continue;
    }
    if (r.type == static_cast<uint16_t>(Command::kDisc)) {
      co_return;  // no reply; the caller drains and closes
    }
    Bytes payload;
    if (has_payload) {
      payload.resize(r.length);
      std::tie(ec, n) = co_await asio::async_read(socket_, asio::buffer(payload),
                                                  kTuple);
      if (ec) {
        BR_LOG_WARN("nbd", "client {} ({}) disconnected in the middle of a "
                    "{}-byte WRITE", id_, peer_, r.length);
        co_return;
      }
    }
    ++in_flight_;
    in_flight_bytes_ += has_payload || r.type == 0 ? r.length : 0;
    asio::co_spawn(socket_.get_executor(),
                   Handle(r, std::move(payload)), asio::detached);
  }
}

void Session::Finished(size_t payload_bytes) {
  --in_flight_;
  in_flight_bytes_ -= payload_bytes;
  capacity_signal_.cancel();
}

asio::awaitable<void> Session::Handle(Request r, Bytes payload) {
  auto self = shared_from_this();
  const size_t accounted =
      (r.type == static_cast<uint16_t>(Command::kWrite) || r.type == 0)
          ? r.length : 0;
  const bool fua = r.flags & kCmdFlagFua;
  Status s;
  switch (static_cast<Command>(r.type)) {
    case Command::kRead:
      co_await HandleRead(r);
      Finished(accounted);
      co_return;
    case Command::kBlockStatus:
      co_await HandleBlockStatus(r);
      Finished(accounted);
      co_return;
    case Command::kWrite: {
      core::Volume* volume = volume_.get();
      s = co_await io_.Run([volume, &payload, &r, fua] {
        return volume->Write(r.offset, payload, fua);
      });
      break;
    }
    case Command::kFlush: {
      core::Volume* volume = volume_.get();
      s = co_await io_.Run([volume] { return volume->Flush(); });
      break;
    }
    case Command::kTrim: {
      core::Volume* volume = volume_.get();
      s = co_await io_.Run([volume, &r, fua] {
        return volume->Trim(r.offset, r.length, fua);
      });
      break;
    }
    case Command::kWriteZeroes: {
      core::Volume* volume = volume_.get();
      const bool may_trim = !(r.flags & kCmdFlagNoHole);
      const bool fast_only = r.flags & kCmdFlagFastZero;
      s = co_await io_.Run([volume, &r, may_trim, fast_only, fua] {
        return volume->WriteZeroes(r.offset, r.length, may_trim, fast_only,
                                   fua);
      });
      break;
    }
    case Command::kCache: {
      core::Volume* volume = volume_.get();
      s = co_await io_.Run([volume, &r] {
        return volume->Cache(r.offset, r.length);
      });
      break;
    }
    case Command::kDisc:
      break;  // handled by the reader
  }
  if (s.ok()) {
    SendOk(r);
  } else {
    uint32_t error = ToNbdError(s);
    if (!s.IsNotSupported()) {
      BR_LOG_ERROR("nbd", "client {} ({}): {} at {}+{} failed: {}", id_, peer_,
                   CommandName(r.type), r.offset, r.length, s.ToString());
    }
    SendError(r, error, s.message());
  }
  Finished(accounted);
}

asio::awaitable<void> Session::HandleRead(const Request& r) {
  Bytes data(r.length);
  core::Volume* volume = volume_.get();
  Status s = co_await io_.Run([volume, &data, &r] {
    return volume->Read(r.offset, data);
  });
  if (!s.ok()) {
    BR_LOG_ERROR("nbd", "client {} ({}): READ at {}+{} failed: {}", id_, peer_,
                 r.offset, r.length, s.ToString());
    SendError(r, ToNbdError(s), s.message());
    co_return;
  }
  Bytes header;
  if (state_.structured_replies) {
    if (r.length == 0) {
      AppendStructuredDone(header, r.cookie);
      Send(std::move(header));
      co_return;
    }
    AppendStructuredHeader(header, kReplyFlagDone, kReplyTypeOffsetData,
                           r.cookie, static_cast<uint32_t>(8 + r.length));
    AppendBe64(header, r.offset);
  } else {
    AppendSimpleReply(header, 0, r.cookie);
  }
  Send(std::move(header), std::move(data));
}

asio::awaitable<void> Session::HandleBlockStatus(const Request& r) {
  core::Volume* volume = volume_.get();
  auto extents = co_await io_.Run([volume, &r] {
    return volume->BlockStatus(r.offset, r.length);
  });
  if (!extents.ok()) {
    BR_LOG_ERROR("nbd", "client {} ({}): BLOCK_STATUS at {}+{} failed: {}", id_,
                 peer_, r.offset, r.length, extents.status().ToString());
    SendError(r, ToNbdError(extents.status()), extents.status().message());
    co_return;
  }
  std::vector<StatusExtent> wire;
  const bool req_one = r.flags & kCmdFlagReqOne;
  // Extent lengths are u32 on the wire; split long runs at a 4 KiB-aligned
  // bound below 4 GiB.
  constexpr uint64_t kMaxWireExtent = 0xFFFFF000ull;
  uint64_t covered = 0;
  for (const auto& e : *extents) {
    uint64_t left = e.length_bytes;
    uint32_t flags = (e.hole ? kStateHole : 0) | (e.zero ? kStateZero : 0);
    while (left > 0) {
      uint64_t piece = std::min(left, kMaxWireExtent);
      if (req_one) piece = std::min<uint64_t>(piece, r.length);
      wire.push_back({static_cast<uint32_t>(piece), flags});
      left -= piece;
      covered += piece;
      if (req_one || covered >= r.length) break;
    }
    if (req_one || covered >= r.length) break;
  }
  Bytes reply;
  AppendBlockStatusChunk(reply, r.cookie, kBaseAllocationId, wire);
  Send(std::move(reply));
}

void Session::Send(Bytes header, Bytes data) {
  if (broken_) return;
  outbox_.push_back({std::move(header), std::move(data)});
  outbox_signal_.cancel_one();
}

void Session::SendOk(const Request& r) {
  Bytes header;
  AppendSimpleReply(header, 0, r.cookie);
  Send(std::move(header));
}

void Session::SendError(const Request& r, uint32_t error,
                        std::string_view reason) {
  Bytes header;
  // With structured replies a READ must never get a simple reply; other
  // commands may, but an error chunk carries the reason to the client.
  if (state_.structured_replies) {
    AppendStructuredError(header, r.cookie, error, reason);
  } else {
    AppendSimpleReply(header, error, r.cookie);
  }
  Send(std::move(header));
}

asio::awaitable<void> Session::WriteReplies() {
  auto self = shared_from_this();
  std::vector<OutMessage> batch;
  std::vector<asio::const_buffer> buffers;
  for (;;) {
    if (outbox_.empty()) {
      if (stopping_ && in_flight_ == 0) break;
      co_await outbox_signal_.async_wait(kTuple);
      continue;
    }
    batch.clear();
    buffers.clear();
    while (!outbox_.empty() && batch.size() < kMaxBatchMessages) {
      batch.push_back(std::move(outbox_.front()));
      outbox_.pop_front();
    }
    for (const auto& m : batch) {
      buffers.push_back(asio::buffer(m.header));
      if (!m.data.empty()) buffers.push_back(asio::buffer(m.data));
    }
    auto [ec, n] = co_await asio::async_write(socket_, buffers, kTuple);
    if (ec) {
      if (ec != asio::error::broken_pipe && ec != asio::error::connection_reset) {
        BR_LOG_WARN("nbd", "client {} ({}): write failed: {}", id_, peer_,
                    ec.message());
      }
      broken_ = true;
      outbox_.clear();
      // Unblock the reader so the session can end.
      asio::error_code ignored;
      socket_.shutdown(asio::socket_base::shutdown_both, ignored);
      break;
    }
  }
  writer_done_ = true;
  capacity_signal_.cancel();
}

}  // namespace blockrelay::nbd
