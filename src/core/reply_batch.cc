#include "blockrelay/core/reply_batch.h"

#include <cassert>
#include <utility>

namespace blockrelay::core {

namespace {
thread_local int t_depth = 0;
thread_local std::vector<std::function<void()>> t_deferred;
}  // namespace

ReplyBatch::ReplyBatch() : outermost_(t_depth == 0) { ++t_depth; }

ReplyBatch::~ReplyBatch() {
  --t_depth;
  if (!outermost_) return;
  // A deferred send may open a batch of its own (and defer into it): take
  // the list first, so that one starts empty.
  std::vector<std::function<void()>> deferred;
  deferred.swap(t_deferred);
  for (auto& send : deferred) send();
}

bool ReplyBatch::Active() { return t_depth > 0; }

void ReplyBatch::Defer(std::function<void()> send) {
  assert(t_depth > 0);
  t_deferred.push_back(std::move(send));
}

}  // namespace blockrelay::core
