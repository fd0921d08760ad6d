// Session: one NBD client connection, from greeting to close.
//
// Threads: the handshake and the request reader run as coroutines on the
// server's io_context thread, which alone reads from the socket. A small
// request that cannot block (see TryExecuteInline) is carried out right there
// when nothing else is in flight; a FLUSH joins the volume's group commit
// (Volume::FlushShared) and is answered from the pool thread that ran its
// store flush; every other request is carried out on an IoExecutor pool
// thread, which also sends its reply
// straight away: a reply costs no hop back to the network thread. Replies are
// serialised by out_mu_: whichever thread finds no send in progress becomes
// the sender and writes everything queued (several replies in one sendmsg);
// if the socket is full it hands the rest to an async writer on the network
// thread. Replies leave out of order, as requests finish. Replies of
// requests carried out inline from the read buffer are held back and sent
// together before the network thread next waits (CorkScope, FlushCorked).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include <asio/awaitable.hpp>
#include <asio/generic/stream_protocol.hpp>
#include <asio/steady_timer.hpp>

#include "blockrelay/core/io_executor.h"
#include "blockrelay/core/volume.h"
#include "nbd/handshake.h"
#include "nbd/protocol.h"
#include "nbd/request_validation.h"

namespace blockrelay::nbd {

class VolumeCatalog;

// Allocator that leaves new elements uninitialised: request payloads and
// read buffers are overwritten at once, and zero-filling a 32 MiB buffer
// first would cost as much as the copy itself.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// A data buffer: WRITE payloads and READ replies.
using DataBuffer = std::vector<std::byte, DefaultInitAllocator<std::byte>>;

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Socket = asio::generic::stream_protocol::socket;

  Session(Socket socket, const VolumeCatalog& catalog, core::IoExecutor& io,
          uint64_t id, std::string peer);

  // Runs the connection to its end. The session keeps itself alive.
  asio::awaitable<void> Run();

  // Graceful stop: no new requests are read; requests in flight finish and
  // their replies are sent; then the connection closes. Network thread only.
  void RequestStop();

  // Hard stop, for a client that does not read its replies: shuts the
  // socket down so pending sends fail. Requests already running still
  // finish (their writes land); their replies are dropped.
  void Abort();

  uint64_t id() const { return id_; }

 private:
  struct OutMessage {
    Bytes header;
    DataBuffer data;  // READ payload, sent after header without a copy
  };

  asio::awaitable<bool> Handshake();
  asio::awaitable<void> ReadRequests();
  // Fills `out` from the read buffer and the socket.
  asio::awaitable<bool> ReadExactly(std::span<std::byte> out);
  // Reads and drops `length` bytes: the payload of a WRITE we refuse.
  asio::awaitable<bool> Discard(uint64_t length);
  asio::awaitable<void> WaitForWake();

  // Pool thread: carries out one validated request; its reply follows,
  // then Finished(accounted).
  void Execute(const Request& r, DataBuffer& payload, size_t accounted);
  void ExecuteRead(const Request& r);
  // Any thread: hands a FLUSH to Volume::FlushShared(); its reply and
  // Finished(accounted) follow when the store flush covering it is done.
  void ExecuteFlush(const Request& r, size_t accounted);
  // Network thread: carries out `r` at once if that cannot block on the
  // disk; false (nothing done) otherwise.
  bool TryExecuteInline(const Request& r, std::span<const std::byte> payload,
                        size_t accounted);
  // Network thread: copies `out.size()` bytes from the read buffer if it
  // holds them all; false (nothing taken) otherwise.
  bool TakeBuffered(std::span<std::byte> out);
  // While one exists, replies Send() gets on this thread for this session
  // are queued without being sent (network thread, around requests carried
  // out inline). FlushCorked() sends them (any thread); the reader calls it
  // before every wait, so a held reply never waits for the client's next
  // request.
  struct CorkScope {
    explicit CorkScope(Session* session);
    ~CorkScope();
    CorkScope(const CorkScope&) = delete;
    CorkScope& operator=(const CorkScope&) = delete;
  };
  void FlushCorked();
  // Replies to a write-path request with status `s`, first waiting for the
  // sync downstreams when the volume has any, then calls Finished().
  void Complete(const Request& r, Status s, core::ReplicationSink::Ticket ticket,
                bool durable, size_t accounted);
  void Reply(const Request& r, const Status& s);
  void ExecuteBlockStatus(const Request& r);

  // Any thread.
  void Send(OutMessage message);
  void SendError(const Request& r, uint32_t error, std::string_view reason);
  void SendOk(const Request& r);
  void SendReadData(const Request& r, DataBuffer data);
  void Finished(size_t payload_bytes);
  // A writer streams through the volume: the next intent extents are
  // declared on a pool thread before it needs them (Volume::
  // IntentReadaheadDue). Counted in flight, so the session (and the
  // volume's Close at shutdown) waits for it.
  void StartIntentReadaheadIfDue();
  // Wakes the network-thread coroutine if it waits for capacity or drain.
  void WakeReader();
  // Sends queued messages without blocking; returns false when the socket
  // is full and the rest must go through the async writer. REQUIRES: the
  // caller is the sender.
  bool SendQueuedNow();
  asio::awaitable<void> AsyncDrain();
  void MarkBroken();

  Socket socket_;
  const VolumeCatalog& catalog_;
  core::IoExecutor& io_;
  const uint64_t id_;
  const std::string peer_;

  // Set when transmission starts, constant afterwards.
  std::shared_ptr<core::Volume> volume_;
  TransmissionState state_;

  // Read side: network thread only.
  std::vector<std::byte> read_buffer_;
  size_t read_pos_ = 0;
  size_t read_end_ = 0;
  bool stopping_ = false;
  asio::steady_timer wake_;

  std::atomic<size_t> in_flight_{0};
  // Requests handed to the pool whose Execute() has not returned (in_flight_
  // also counts those waiting only for replication acknowledgements).
  std::atomic<size_t> executing_{0};
  std::atomic<size_t> in_flight_bytes_{0};
  // Reply bytes queued but not yet written to the socket. They count
  // against kMaxInFlightBytes too: a client that stops reading must not
  // make us buffer its READ replies without bound.
  std::atomic<size_t> unsent_bytes_{0};
  std::atomic<bool> reader_waiting_{false};
  std::atomic<bool> broken_{false};

  std::mutex out_mu_;
  std::deque<OutMessage> outbox_;  // GUARDED_BY(out_mu_)
  // Bytes of outbox_.front() already written.  GUARDED_BY(out_mu_)
  size_t front_sent_ = 0;
  bool sending_ = false;  // GUARDED_BY(out_mu_)
  // Replies were queued under a CorkScope or a core::ReplyBatch and nobody
  // has sent them yet; FlushCorked() will.  GUARDED_BY(out_mu_)
  bool corked_ = false;
};

}  // namespace blockrelay::nbd
