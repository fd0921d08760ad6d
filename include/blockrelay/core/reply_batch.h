// ReplyBatch: replies completed together leave together.
//
// One acknowledgement from a sync downstream releases every write it covers
// at once, often dozens on one NBD connection. Sent one by one, each reply
// costs a sendmsg and a wake-up of the client. A thread that completes
// several requests in a row opens a ReplyBatch around the loop; a connection
// asked to send while it is open queues the reply and defers the send to the
// batch's end (Defer), so its replies go out in one call.
//
// Thread-local: a batch covers only what its own thread does while it is
// open. Nesting is allowed; the outermost batch runs the deferred sends.
#pragma once

#include <functional>
#include <vector>

namespace blockrelay::core {

class ReplyBatch {
 public:
  ReplyBatch();
  ~ReplyBatch();
  ReplyBatch(const ReplyBatch&) = delete;
  ReplyBatch& operator=(const ReplyBatch&) = delete;

  // True while a batch is open on the calling thread.
  static bool Active();
  // Runs `send` when the calling thread's outermost batch closes. REQUIRES:
  // Active().
  static void Defer(std::function<void()> send);

 private:
  bool outermost_;
};

}  // namespace blockrelay::core
