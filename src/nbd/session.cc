#include "nbd/session.h"

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <vector>

#include <asio/buffer.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/read.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include "blockrelay/core/reply_batch.h"
#include "nbd/volume_catalog.h"
#include "util/logging.h"

namespace blockrelay::nbd {
namespace {

constexpr auto kTuple = asio::experimental::as_tuple(asio::use_awaitable);

// Back-pressure: stop reading requests while this much is in flight, so a
// client pipelining huge writes cannot make us buffer without bound.
constexpr size_t kMaxInFlightRequests = 256;
constexpr size_t kMaxInFlightBytes = 256u << 20;

// Pipelined small requests are parsed from one buffer filled by one recv;
// payloads at least this large are read straight into their own buffer.
constexpr size_t kReadBufferBytes = 256u << 10;
constexpr size_t kDirectReadBytes = 64u << 10;

// Largest request TryExecuteInline() considers.
constexpr uint32_t kInlineMaxBytes = 64u << 10;

// Replies gathered into one sendmsg at most (IOV_MAX is 1024).
constexpr size_t kMaxBatchMessages = 256;

size_t MessageBytes(const auto& m) { return m.header.size() + m.data.size(); }

// The session whose network-thread replies are being held back
// (Session::CorkScope), or null.
thread_local const void* t_corked_session = nullptr;

}  // namespace

Session::Session(Socket socket, const VolumeCatalog& catalog,
                 core::IoExecutor& io, uint64_t id, std::string peer)
    : socket_(std::move(socket)),
      catalog_(catalog),
      io_(io),
      id_(id),
      peer_(std::move(peer)),
      wake_(socket_.get_executor()) {
  wake_.expires_at(asio::steady_timer::time_point::max());
}

void Session::RequestStop() {
  if (stopping_) return;
  stopping_ = true;
  // Ends a pending read with EOF while letting replies still go out.
  asio::error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_receive, ec);
  if (!volume_) socket_.close(ec);  // still negotiating: nothing to finish
}

void Session::Abort() {
  RequestStop();
  ::shutdown(socket_.native_handle(), SHUT_RDWR);
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
  read_buffer_.resize(kReadBufferBytes);
  co_await ReadRequests();
  FlushCorked();

  // Reader ended (DISC, EOF, stop or a fatal client error): let requests in
  // flight finish and their replies go out, then close.
  stopping_ = true;
  for (;;) {
    reader_waiting_.store(true);
    bool drained;
    {
      std::lock_guard lock(out_mu_);
      drained = in_flight_.load() == 0 && !sending_ && !corked_;
    }
    if (drained) break;
    co_await WaitForWake();
  }
  reader_waiting_.store(false);
  asio::error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_both, ec);
  socket_.close(ec);
  volume_->RemoveClient();
  BR_LOG_INFO("nbd", "client {} ({}) detached from export {}", id_, peer_,
              volume_->name());
}

asio::awaitable<void> Session::WaitForWake() {
  co_await wake_.async_wait(kTuple);
}

void Session::WakeReader() {
  if (reader_waiting_.exchange(false)) {
    asio::post(socket_.get_executor(),
               [self = shared_from_this()] { self->wake_.cancel(); });
  }
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

asio::awaitable<bool> Session::ReadExactly(std::span<std::byte> out) {
  size_t done = 0;
  while (done < out.size()) {
    if (read_pos_ < read_end_) {
      size_t n = std::min(out.size() - done, read_end_ - read_pos_);
      std::memcpy(out.data() + done, read_buffer_.data() + read_pos_, n);
      read_pos_ += n;
      done += n;
      continue;
    }
    if (out.size() - done >= kDirectReadBytes || read_buffer_.empty()) {
      // asio's default completion conditions read at most 64 KiB per
      // recv; ask for everything that is left instead.
      const size_t want = out.size() - done;
      auto [ec, n] = co_await asio::async_read(
          socket_, asio::buffer(out.data() + done, want),
          [want](const asio::error_code& e, size_t total) -> size_t {
            return e ? 0 : want - total;
          },
          kTuple);
      if (ec) co_return false;
      done += n;
      continue;
    }
    read_pos_ = read_end_ = 0;
    auto [ec, n] = co_await socket_.async_read_some(asio::buffer(read_buffer_),
                                                    kTuple);
    if (ec) co_return false;
    read_end_ = n;
  }
  co_return true;
}

asio::awaitable<bool> Session::Discard(uint64_t length) {
  std::vector<std::byte> sink(std::min<uint64_t>(length, 1 << 20));
  while (length > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(length, sink.size()));
    if (!co_await ReadExactly(std::span(sink.data(), chunk))) co_return false;
    length -= chunk;
  }
  co_return true;
}

asio::awaitable<void> Session::ReadRequests() {
  auto self = shared_from_this();
  std::array<std::byte, kRequestHeaderBytes> header_bytes;
  while (!stopping_ && !broken_.load()) {
    for (;;) {
      reader_waiting_.store(true);
      if (in_flight_.load() < kMaxInFlightRequests &&
          in_flight_bytes_.load() + unsent_bytes_.load() < kMaxInFlightBytes) {
        break;
      }
      FlushCorked();
      co_await WaitForWake();
      if (broken_.load()) co_return;
    }
    reader_waiting_.store(false);
    // Pipelined requests are usually already in the read buffer: taking
    // them from there without a coroutine call (a frame allocation each)
    // showed in the profile of 4 KiB writes at QD32. Replies held back
    // meanwhile leave before this coroutine can wait on the socket.
    if (!TakeBuffered(header_bytes)) {
      FlushCorked();
      // A write just captured for a sync link woke the link, whose send is
      // queued on this thread: let it go out before the read below, whose
      // first recv usually finds nothing at queue depth 1 and would
      // otherwise sit between the write and its frame, in the latency of
      // every write whose reply waits for the downstream.
      if (const core::ReplicationSink* sink = volume_->replication();
          sink && sink->RepliesWait()) {
        co_await asio::post(socket_.get_executor(), asio::use_awaitable);
      }
      if (!co_await ReadExactly(header_bytes)) {
        if (!stopping_ && !broken_.load()) {
          BR_LOG_INFO("nbd", "client {} ({}) closed the connection without "
                      "NBD_CMD_DISC", id_, peer_);
        }
        co_return;
      }
    }
    auto request = DecodeRequest(header_bytes);
    if (!request.ok()) {
      // Without valid magic the stream cannot be resynchronised: the spec
      // allows a hard disconnect, as nbdkit does.
      BR_LOG_WARN("nbd", "client {} ({}): {}; closing", id_, peer_,
                  request.status().message());
      co_return;
    }
    const Request r = *request;
    auto rejection = ValidateRequest(r, state_);
    const bool has_payload = r.type == static_cast<uint16_t>(Command::kWrite);
    if (rejection) {
      BR_LOG_INFO("nbd", "client {} ({}): {} refused: {}", id_, peer_,
                  CommandName(r.type), rejection->reason);
      // The payload of a refused WRITE is still on the wire.
      FlushCorked();
      if (has_payload && !co_await Discard(r.length)) co_return;
      SendError(r, rejection->error, rejection->reason);
      continue;
    }
    if (r.type == static_cast<uint16_t>(Command::kDisc)) {
      co_return;  // no reply; Run() drains and closes
    }
    // A small WRITE whose payload is already in the read buffer is carried
    // out from there when it can be done inline: no payload buffer to
    // allocate, no copy into it.
    bool inline_declined = false;
    if (has_payload && executing_.load() == 0 && r.length <= kInlineMaxBytes &&
        read_end_ - read_pos_ >= r.length) {
      const std::span<const std::byte> buffered(read_buffer_.data() + read_pos_,
                                                r.length);
      in_flight_.fetch_add(1);
      in_flight_bytes_.fetch_add(r.length);
      bool done;
      {
        CorkScope cork(this);
        done = TryExecuteInline(r, buffered, r.length);
      }
      if (done) {
        read_pos_ += r.length;
        continue;
      }
      in_flight_.fetch_sub(1);
      in_flight_bytes_.fetch_sub(r.length);
      inline_declined = true;
    }
    DataBuffer payload;
    if (has_payload) {
      payload.resize(r.length);
      if (!TakeBuffered(payload)) {
        FlushCorked();
        if (!co_await ReadExactly(payload)) {
          BR_LOG_WARN("nbd", "client {} ({}) disconnected in the middle of a "
                      "{}-byte WRITE", id_, peer_, r.length);
          co_return;
        }
      }
    }
    const size_t accounted =
        has_payload || r.type == static_cast<uint16_t>(Command::kRead)
            ? r.length : 0;
    in_flight_.fetch_add(1);
    in_flight_bytes_.fetch_add(accounted);
    if (r.type == static_cast<uint16_t>(Command::kFlush)) {
      ExecuteFlush(r, accounted);
      continue;
    }
    // With nothing executing on the pool, a small request is cheaper to
    // carry out here than to hand to a pool thread and wake it (the hop is
    // most of a QD1 request's latency). Only what cannot wait on the disk
    // qualifies: a buffered write without FUA whose scoreboard bits are
    // already durable, or a read the page cache holds. Requests that only
    // wait for a sync downstream's acknowledgement do not count: with a
    // sync link a pipelined writer keeps many of those in flight, and
    // sending each write to the pool would cost a hop and a wake-up each.
    // Everything else, and every request while another executes on the
    // pool, goes to the pool.
    if (!inline_declined && executing_.load() == 0 && r.length <= kInlineMaxBytes) {
      CorkScope cork(this);
      if (TryExecuteInline(r, payload, accounted)) continue;
    }
    if (has_payload || r.type == static_cast<uint16_t>(Command::kWriteZeroes) ||
        r.type == static_cast<uint16_t>(Command::kTrim)) {
      volume_->Announce(r.offset, r.length);
    }
    executing_.fetch_add(1);
    io_.Post([self, r, accounted, payload = std::move(payload)]() mutable {
      self->Execute(r, payload, accounted);
      self->executing_.fetch_sub(1);
    });
  }
}

void Session::Finished(size_t payload_bytes) {
  in_flight_bytes_.fetch_sub(payload_bytes);
  in_flight_.fetch_sub(1);
  WakeReader();
}

bool Session::TakeBuffered(std::span<std::byte> out) {
  if (read_end_ - read_pos_ < out.size()) return false;
  std::memcpy(out.data(), read_buffer_.data() + read_pos_, out.size());
  read_pos_ += out.size();
  return true;
}

bool Session::TryExecuteInline(const Request& r,
                               std::span<const std::byte> payload,
                               size_t accounted) {
  if (r.flags & kCmdFlagFua) return false;
  if (r.type == static_cast<uint16_t>(Command::kWrite)) {
    core::WriteContext ctx;
    auto s = volume_->TryWriteWithoutWaiting(r.offset, payload, &ctx);
    if (!s) return false;
    Complete(r, std::move(*s), ctx.ticket, /*durable=*/false, accounted);
    return true;
  }
  if (r.type == static_cast<uint16_t>(Command::kRead)) {
    DataBuffer data(r.length);
    if (!volume_->ReadIfCached(r.offset, data)) return false;
    SendReadData(r, std::move(data));
    Finished(accounted);
    return true;
  }
  return false;
}

void Session::StartIntentReadaheadIfDue() {
  if (!volume_->IntentReadaheadDue()) return;
  in_flight_.fetch_add(1);
  io_.Post([self = shared_from_this()] {
    // A failure is sticky: the next write that needs the scoreboard fails
    // with it and names it.
    Status s = self->volume_->CommitIntentReadahead();
    if (!s.ok()) {
      BR_LOG_ERROR("nbd", "client {} ({}): declaring intent extents ahead of a "
                   "sequential writer failed: {}", self->id_, self->peer_,
                   s.ToString());
    }
    self->Finished(0);
  });
}

void Session::Complete(const Request& r, Status s,
                       core::ReplicationSink::Ticket ticket, bool durable,
                       size_t accounted) {
  StartIntentReadaheadIfDue();
  core::ReplicationSink* sink = volume_->replication();
  if (s.ok() && ticket != 0 && sink && sink->RepliesWait()) {
    // The reply waits until the sync downstreams have the write (durably,
    // for FLUSH and FUA): DESIGN.md, Invariant 4.
    auto self = shared_from_this();
    sink->WhenAcknowledged(ticket, durable,
                           [self, r, accounted](Status acked) {
                             self->Reply(r, acked);
                             self->Finished(accounted);
                           });
    return;
  }
  Reply(r, s);
  Finished(accounted);
}

void Session::Reply(const Request& r, const Status& s) {
  if (s.ok()) {
    SendOk(r);
    return;
  }
  if (!s.IsNotSupported()) {
    BR_LOG_ERROR("nbd", "client {} ({}): {} at {}+{} failed: {}", id_, peer_,
                 CommandName(r.type), r.offset, r.length, s.ToString());
  }
  SendError(r, ToNbdError(s), s.message());
}

void Session::Execute(const Request& r, DataBuffer& payload, size_t accounted) {
  core::Volume& volume = *volume_;
  core::WriteContext ctx;
  const bool fua = r.flags & kCmdFlagFua;
  Status s;
  // ValidateRequest() accepts zero-length TRIM, WRITE_ZEROES and CACHE; they
  // change nothing. The store must not see them: fallocate() fails a length
  // of 0 with EINVAL and posix_fadvise() takes it as "to the end of file".
  const bool no_op = r.length == 0 &&
                     (r.type == static_cast<uint16_t>(Command::kTrim) ||
                      r.type == static_cast<uint16_t>(Command::kWriteZeroes) ||
                      r.type == static_cast<uint16_t>(Command::kCache));
  if (no_op) {
    SendOk(r);
    Finished(accounted);
    return;
  }
  switch (static_cast<Command>(r.type)) {
    case Command::kRead:
      ExecuteRead(r);
      Finished(accounted);
      return;
    case Command::kBlockStatus:
      ExecuteBlockStatus(r);
      Finished(accounted);
      return;
    case Command::kWrite:
      s = volume.Write(r.offset, payload, fua, &ctx);
      break;
    case Command::kFlush:
      ExecuteFlush(r, accounted);
      return;
    case Command::kTrim:
      s = volume.Trim(r.offset, r.length, fua, &ctx);
      break;
    case Command::kWriteZeroes:
      s = volume.WriteZeroes(r.offset, r.length,
                             /*may_trim=*/!(r.flags & kCmdFlagNoHole),
                             /*fast_only=*/r.flags & kCmdFlagFastZero, fua, &ctx);
      break;
    case Command::kCache:
      s = volume.Cache(r.offset, r.length);
      break;
    case Command::kDisc:
      break;  // handled by the reader
  }
  Complete(r, std::move(s), ctx.ticket, /*durable=*/fua, accounted);
}

void Session::ExecuteFlush(const Request& r, size_t accounted) {
  // Waits without a thread: a FLUSH storm must not take the pool threads
  // the writes need. Answered from the pool thread whose store flush
  // covers it (or at once, after a sticky error).
  volume_->FlushShared(
      io_, [self = shared_from_this(), r, accounted](
               Status s, core::ReplicationSink::Ticket ticket) {
        self->Complete(r, std::move(s), ticket, /*durable=*/true, accounted);
      });
}

void Session::ExecuteRead(const Request& r) {
  DataBuffer data(r.length);
  Status s = volume_->Read(r.offset, data);
  if (!s.ok()) {
    BR_LOG_ERROR("nbd", "client {} ({}): READ at {}+{} failed: {}", id_, peer_,
                 r.offset, r.length, s.ToString());
    SendError(r, ToNbdError(s), s.message());
    return;
  }
  SendReadData(r, std::move(data));
}

void Session::SendReadData(const Request& r, DataBuffer data) {
  Bytes header;
  if (state_.structured_replies) {
    if (r.length == 0) {
      AppendStructuredDone(header, r.cookie);
      Send({std::move(header), {}});
      return;
    }
    AppendStructuredHeader(header, kReplyFlagDone, kReplyTypeOffsetData,
                           r.cookie, static_cast<uint32_t>(8 + r.length));
    AppendBe64(header, r.offset);
  } else {
    AppendSimpleReply(header, 0, r.cookie);
  }
  Send({std::move(header), std::move(data)});
}

void Session::ExecuteBlockStatus(const Request& r) {
  auto extents = volume_->BlockStatus(r.offset, r.length);
  if (!extents.ok()) {
    BR_LOG_ERROR("nbd", "client {} ({}): BLOCK_STATUS at {}+{} failed: {}", id_,
                 peer_, r.offset, r.length, extents.status().ToString());
    SendError(r, ToNbdError(extents.status()), extents.status().message());
    return;
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
  Send({std::move(reply), {}});
}

void Session::SendOk(const Request& r) {
  Bytes header;
  AppendSimpleReply(header, 0, r.cookie);
  Send({std::move(header), {}});
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
  Send({std::move(header), {}});
}

Session::CorkScope::CorkScope(Session* session) { t_corked_session = session; }
Session::CorkScope::~CorkScope() { t_corked_session = nullptr; }

void Session::FlushCorked() {
  bool send = false;
  {
    std::lock_guard lock(out_mu_);
    if (!corked_) return;
    corked_ = false;
    // Another thread's send may have taken the held replies along.
    if (!sending_ && !outbox_.empty() && !broken_.load()) send = sending_ = true;
  }
  if (!send) {
    WakeReader();  // Run()'s drain waits for corked_ to clear too
    return;
  }
  if (SendQueuedNow()) return;
  asio::co_spawn(socket_.get_executor(), AsyncDrain(), asio::detached);
}

void Session::Send(OutMessage message) {
  {
    std::lock_guard lock(out_mu_);
    if (broken_.load()) return;
    unsent_bytes_.fetch_add(MessageBytes(message));
    outbox_.push_back(std::move(message));
    if (sending_) return;  // the current sender will pick it up
    if (t_corked_session == this) {
      // The network thread is taking pipelined requests from its read
      // buffer: their replies leave together, in one sendmsg, before it
      // next waits (FlushCorked).
      corked_ = true;
      return;
    }
    if (core::ReplyBatch::Active()) {
      // This thread completes several requests in a row (an acknowledgement
      // from a sync downstream releases many): send once, at its end.
      if (!corked_) {
        corked_ = true;
        core::ReplyBatch::Defer([self = shared_from_this()] { self->FlushCorked(); });
      }
      return;
    }
    corked_ = false;  // held replies, if any, go with this send
    sending_ = true;
  }
  if (SendQueuedNow()) return;
  // The socket is full: the network thread finishes the job asynchronously.
  asio::co_spawn(socket_.get_executor(), AsyncDrain(), asio::detached);
}

bool Session::SendQueuedNow() {
  std::vector<iovec> iov;
  for (;;) {
    iov.clear();
    {
      std::lock_guard lock(out_mu_);
      if (outbox_.empty() || broken_.load()) {
        sending_ = false;
        break;
      }
      // The deque's elements stay put while we send unlocked: other threads
      // only push_back, which does not move existing elements.
      size_t skip = front_sent_;
      for (size_t i = 0; i < outbox_.size() && iov.size() + 2 <= kMaxBatchMessages * 2; ++i) {
        const std::span<std::byte> parts[] = {outbox_[i].header,
                                               outbox_[i].data};
        for (std::span<std::byte> part : parts) {
          if (part.size() <= skip) {
            skip -= part.size();
            continue;
          }
          iov.push_back({part.data() + skip, part.size() - skip});
          skip = 0;
        }
      }
    }
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = iov.size();
    ssize_t n = ::sendmsg(socket_.native_handle(), &msg,
                          MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      if (errno != EPIPE && errno != ECONNRESET) {
        BR_LOG_WARN("nbd", "client {} ({}): send failed: {}", id_, peer_,
                    std::strerror(errno));
      }
      MarkBroken();
      break;
    }
    std::lock_guard lock(out_mu_);
    size_t sent = front_sent_ + static_cast<size_t>(n);
    while (!outbox_.empty() && sent >= MessageBytes(outbox_.front())) {
      sent -= MessageBytes(outbox_.front());
      unsent_bytes_.fetch_sub(MessageBytes(outbox_.front()));
      outbox_.pop_front();
    }
    front_sent_ = sent;
  }
  WakeReader();
  return true;
}

asio::awaitable<void> Session::AsyncDrain() {
  auto self = shared_from_this();
  // Wait until the socket can take more, then go back to sending without
  // blocking; repeat until the outbox is empty.
  for (;;) {
    auto [ec] = co_await socket_.async_wait(asio::socket_base::wait_write,
                                            kTuple);
    if (ec) {
      MarkBroken();
      {
        std::lock_guard lock(out_mu_);
        sending_ = false;
      }
      WakeReader();
      co_return;
    }
    if (SendQueuedNow()) co_return;
  }
}

// REQUIRES: called by the current sender (nobody else touches outbox_
// elements outside the lock).
void Session::MarkBroken() {
  {
    std::lock_guard lock(out_mu_);
    broken_.store(true);
    for (const auto& m : outbox_) unsent_bytes_.fetch_sub(MessageBytes(m));
    outbox_.clear();
    front_sent_ = 0;
    sending_ = false;  // only the sender calls this
  }
  // Ends the reader's pending recv so the session can finish.
  ::shutdown(socket_.native_handle(), SHUT_RDWR);
}

}  // namespace blockrelay::nbd
