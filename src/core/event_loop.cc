#include "blockrelay/core/event_loop.h"

#include <sched.h>

namespace blockrelay::core {

EventLoopStats RunEventLoop(asio::io_context& ctx, const IoExecutor& io,
                            std::chrono::microseconds poll) {
  EventLoopStats stats;
  if (poll.count() <= 0) {
    ctx.run();
    return stats;
  }
  using Clock = std::chrono::steady_clock;
  // Whether the last idle gap was short enough to be worth polling through.
  bool dense = false;
  while (!ctx.stopped()) {
    if (ctx.poll() > 0) continue;
    if (ctx.stopped()) break;
    const auto idle_from = Clock::now();
    bool woke = false;
    if (dense) {
      while (io.pending() == 0 && Clock::now() - idle_from < poll) {
        if (ctx.poll_one() > 0) {
          woke = true;
          ++stats.polled_wakes;
          break;
        }
        if (ctx.stopped()) return stats;
        // Whatever else is runnable on this CPU (the client, a pool
        // thread) goes first.
        sched_yield();
      }
    }
    if (!woke) {
      if (ctx.run_one() == 0) break;
      ++stats.sleeps;
    }
    dense = Clock::now() - idle_from <= poll;
  }
  return stats;
}

}  // namespace blockrelay::core
