// RunEventLoop: the network thread's loop, with adaptive polling.
//
// A request at queue depth 1 spends most of its latency in wake-ups: the
// client's request wakes this thread out of epoll_wait, and on a virtual
// machine waking a halted vCPU costs 10-25 us, more than the request's own
// work. QEMU's IOThreads poll for that reason (poll-max-ns); this loop does
// the same: when events have been arriving less than `poll` apart, it polls
// for the next one (non-blocking epoll_wait, yielding the CPU between tries)
// for up to `poll` before it sleeps. It never polls while storage work is
// queued or running on the IoExecutor, since that work needs the CPU a
// polling thread would take, nor after a gap longer than `poll` (an idle
// daemon sleeps). poll == 0 is io_context::run().
#pragma once

#include <chrono>
#include <cstdint>

#include <asio/io_context.hpp>

#include "blockrelay/core/io_executor.h"

namespace blockrelay::core {

// What the loop did while it was idle, for tests and the curious.
struct EventLoopStats {
  uint64_t sleeps = 0;        // blocking waits (run_one) for the next event
  uint64_t polled_wakes = 0;  // events found by polling, without sleeping
};

// Runs `ctx` on the calling thread until it is stopped or out of work.
EventLoopStats RunEventLoop(asio::io_context& ctx, const IoExecutor& io,
                            std::chrono::microseconds poll);

}  // namespace blockrelay::core
