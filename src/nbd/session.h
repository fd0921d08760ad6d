// Session: one NBD client connection, from greeting to close.
//
// Executor rule: all members are touched only on the server's io_context
// thread. Blocking storage calls go to the IoExecutor; their results come
// back to this thread. The reader coroutine owns receiving; the writer
// coroutine owns sending and drains a queue of replies, sending whatever has
// gathered in one gathered write (chat_server.cpp's pattern), so replies leave
// out of order as requests finish.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>

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

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Socket = asio::generic::stream_protocol::socket;

  Session(Socket socket, const VolumeCatalog& catalog, core::IoExecutor& io,
          uint64_t id, std::string peer);

  // Runs the connection to its end. The session keeps itself alive.
  asio::awaitable<void> Run();

  // Graceful stop: no new requests are read; requests in flight finish and
  // their replies are sent; then the connection closes.
  void RequestStop();

  uint64_t id() const { return id_; }

 private:
  struct OutMessage {
    Bytes header;
    Bytes data;  // READ payload, sent after header without a copy
  };

  asio::awaitable<bool> Handshake();
  asio::awaitable<void> ReadRequests();
  asio::awaitable<void> WriteReplies();
  asio::awaitable<void> Handle(Request request, Bytes payload);
  asio::awaitable<void> HandleRead(const Request& r);
  asio::awaitable<void> HandleBlockStatus(const Request& r);
  // Reads and drops `length` bytes: the payload of a WRITE we refuse.
  asio::awaitable<bool> Discard(uint64_t length);

  void Send(Bytes header, Bytes data = {});
  void SendError(const Request& r, uint32_t error, std::string_view reason);
  void SendOk(const Request& r);
  void Finished(size_t payload_bytes);

  Socket socket_;
  const VolumeCatalog& catalog_;
  core::IoExecutor& io_;
  const uint64_t id_;
  const std::string peer_;

  std::shared_ptr<core::Volume> volume_;  // set when transmission starts
  TransmissionState state_;

  std::deque<OutMessage> outbox_;
  asio::steady_timer outbox_signal_;   // woken by Send() and at close
  asio::steady_timer capacity_signal_;  // woken when requests finish
  size_t in_flight_ = 0;
  size_t in_flight_bytes_ = 0;
  bool stopping_ = false;       // no more requests will be read
  bool writer_done_ = false;    // writer exited (error or drained at stop)
  bool broken_ = false;         // socket failed; nothing more can be sent
};

}  // namespace blockrelay::nbd
