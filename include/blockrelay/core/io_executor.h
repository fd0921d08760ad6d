// IoExecutor: the pool of threads that run blocking storage calls.
//
// The network runs on one io_context thread; pread/pwrite/fdatasync must not
// stall it, so coroutines hand blocking work to this pool with Run() and are
// resumed on their own executor with the result. Nothing here knows about
// NBD or volumes.
//
// Thread safety: Run() may be called from any thread; the callable runs on a
// pool thread and must be safe there.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/post.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>

namespace blockrelay::core {

class IoExecutor {
 public:
  explicit IoExecutor(size_t threads) : pool_(threads) {}
  ~IoExecutor() { Stop(); }
  IoExecutor(const IoExecutor&) = delete;
  IoExecutor& operator=(const IoExecutor&) = delete;

  // Runs `fn()` on a pool thread; the awaiting coroutine resumes on its own
  // executor with fn's result. REQUIRES: fn's result is movable, and fn is
  // trivially destructible (capture raw pointers, not shared_ptr): g++ 12
  // may destroy temporaries in a co_await expression twice (GCC PR 99576).
  template <typename Fn>
  auto Run(Fn fn) -> asio::awaitable<std::invoke_result_t<Fn&>> {
    using R = std::invoke_result_t<Fn&>;
    static_assert(std::is_trivially_destructible_v<Fn>,
                  "capture raw pointers: see the comment above");
    return asio::async_initiate<const asio::use_awaitable_t<>, void(R)>(
        [this](auto handler, Fn fn) {
          Post([fn = std::move(fn), handler = std::move(handler)]() mutable {
            R result = fn();
            auto ex = asio::get_associated_executor(handler);
            asio::post(ex, [handler = std::move(handler),
                            result = std::move(result)]() mutable {
              std::move(handler)(std::move(result));
            });
          });
        },
        asio::use_awaitable, std::move(fn));
  }

  // Runs `fn()` on a pool thread, counted in pending() until it returns;
  // for callers that do not await a result (the NBD session replies
  // straight from the pool thread), and under Run().
  template <typename Fn>
  void Post(Fn fn) {
    pending_.fetch_add(1, std::memory_order_relaxed);
    asio::post(pool_, [this, fn = std::move(fn)]() mutable {
      fn();
      pending_.fetch_sub(1, std::memory_order_release);
    });
  }

  // Calls queued or running on the pool. The network thread polls for its
  // next event only while this is 0 (core/event_loop.h): with storage work
  // in flight a spinning thread would take the CPU that work needs.
  size_t pending() const { return pending_.load(std::memory_order_acquire); }

  // Waits for queued work to finish and joins the threads.
  void Stop() {
    pool_.join();
  }

 private:
  std::atomic<size_t> pending_{0};
  asio::thread_pool pool_;
};

}  // namespace blockrelay::core
