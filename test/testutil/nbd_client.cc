#include "testutil/nbd_client.h"

#include <cerrno>
#include <cstring>
#include <string>

namespace blockrelay::testutil {
namespace {

using Clock = std::chrono::steady_clock;

int LastErrno() {
  int e = nbd_get_errno();
  return e != 0 ? e : EIO;
}

int RemainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - Clock::now());
  if (left.count() <= 0) return 0;
  return static_cast<int>(std::min<int64_t>(left.count(), 100));
}

NbdHandle Create(const NbdOptions& options, std::string* error) {
  NbdHandle h(nbd_create());
  if (!h) {
    if (error) *error = nbd_get_error();
    return nullptr;
  }
  bool ok = nbd_set_export_name(h.get(), options.export_name.c_str()) == 0 &&
            nbd_set_request_structured_replies(h.get(),
                                               options.structured_replies) == 0;
  if (ok && options.base_allocation) {
    ok = nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION) == 0;
  }
  if (ok && options.strict_mode) {
    ok = nbd_set_strict_mode(h.get(), *options.strict_mode) == 0;
  }
  if (ok && options.opt_mode) ok = nbd_set_opt_mode(h.get(), true) == 0;
  if (!ok) {
    if (error) *error = nbd_get_error();
    return nullptr;
  }
  return h;
}

// Drives the handshake started by an aio_connect call.
NbdHandle Finish(NbdHandle h, bool opt_mode, std::string* error,
                 std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (nbd_aio_is_ready(h.get()) == 1) return h;
    if (opt_mode && nbd_aio_is_negotiating(h.get()) == 1) return h;
    if (nbd_aio_is_dead(h.get()) == 1 || nbd_aio_is_closed(h.get()) == 1) {
      if (error) *error = std::string("connection ended: ") + nbd_get_error();
      return nullptr;
    }
    if (Clock::now() >= deadline) {
      if (error) *error = "handshake timed out";
      return nullptr;
    }
    if (nbd_poll(h.get(), RemainingMs(deadline)) == -1) {
      if (error) *error = nbd_get_error();
      return nullptr;
    }
  }
}

int ExtentCallback(void* user_data, const char* metacontext, uint64_t offset,
                   uint32_t* entries, size_t nr_entries, int* error) {
  auto* out = static_cast<std::vector<Extent>*>(user_data);
  if (std::strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    out->push_back({entries[i], entries[i + 1]});
  }
  return 0;
}

int ListCallback(void* user_data, const char* name, const char* description) {
  static_cast<std::vector<std::string>*>(user_data)->push_back(name);
  return 0;
}

struct OptDone {
  bool done = false;
  int error = 0;
};

int OptCompletion(void* user_data, int* error) {
  auto* d = static_cast<OptDone*>(user_data);
  d->done = true;
  d->error = *error;
  return 1;
}

}  // namespace

NbdHandle ConnectUnix(const std::filesystem::path& socket,
                      const NbdOptions& options, std::string* error,
                      std::chrono::milliseconds timeout) {
  NbdHandle h = Create(options, error);
  if (!h) return nullptr;
  if (nbd_aio_connect_unix(h.get(), socket.c_str()) == -1) {
    if (error) *error = nbd_get_error();
    return nullptr;
  }
  return Finish(std::move(h), options.opt_mode, error, timeout);
}

NbdHandle ConnectTcp(uint16_t port, const NbdOptions& options,
                     std::string* error, std::chrono::milliseconds timeout) {
  NbdHandle h = Create(options, error);
  if (!h) return nullptr;
  std::string port_text = std::to_string(port);
  if (nbd_aio_connect_tcp(h.get(), "127.0.0.1", port_text.c_str()) == -1) {
    if (error) *error = nbd_get_error();
    return nullptr;
  }
  return Finish(std::move(h), options.opt_mode, error, timeout);
}

int Await(nbd_handle* h, int64_t cookie, std::chrono::milliseconds timeout) {
  if (cookie == -1) return LastErrno();
  auto deadline = Clock::now() + timeout;
  for (;;) {
    int r = nbd_aio_command_completed(h, static_cast<uint64_t>(cookie));
    if (r == 1) return 0;
    if (r == -1) return LastErrno();
    if (Clock::now() >= deadline) return ETIMEDOUT;
    if (nbd_poll(h, RemainingMs(deadline)) == -1) {
      // The connection died; the command's own status says how.
      r = nbd_aio_command_completed(h, static_cast<uint64_t>(cookie));
      if (r == 1) return 0;
      return LastErrno();
    }
  }
}

bool DrainInFlight(nbd_handle* h, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (nbd_aio_in_flight(h) > 0) {
    if (Clock::now() >= deadline) return false;
    if (nbd_poll(h, RemainingMs(deadline)) == -1) return false;
  }
  return true;
}

int Pread(nbd_handle* h, std::span<std::byte> out, uint64_t offset,
          uint32_t flags) {
  return Await(h, nbd_aio_pread(h, out.data(), out.size(), offset,
                                NBD_NULL_COMPLETION, flags));
}

int Pwrite(nbd_handle* h, std::span<const std::byte> data, uint64_t offset,
           uint32_t flags) {
  return Await(h, nbd_aio_pwrite(h, data.data(), data.size(), offset,
                                 NBD_NULL_COMPLETION, flags));
}

int Flush(nbd_handle* h, uint32_t flags) {
  return Await(h, nbd_aio_flush(h, NBD_NULL_COMPLETION, flags));
}

int Trim(nbd_handle* h, uint64_t count, uint64_t offset, uint32_t flags) {
  return Await(h, nbd_aio_trim(h, count, offset, NBD_NULL_COMPLETION, flags));
}

int Zero(nbd_handle* h, uint64_t count, uint64_t offset, uint32_t flags) {
  return Await(h, nbd_aio_zero(h, count, offset, NBD_NULL_COMPLETION, flags));
}

int Cache(nbd_handle* h, uint64_t count, uint64_t offset, uint32_t flags) {
  return Await(h, nbd_aio_cache(h, count, offset, NBD_NULL_COMPLETION, flags));
}

int BlockStatus(nbd_handle* h, uint64_t count, uint64_t offset,
                std::vector<Extent>* extents, uint32_t flags) {
  extents->clear();
  nbd_extent_callback cb = {.callback = ExtentCallback,
                            .user_data = extents,
                            .free = nullptr};
  return Await(h, nbd_aio_block_status(h, count, offset, cb,
                                       NBD_NULL_COMPLETION, flags));
}

int OptList(nbd_handle* h, std::vector<std::string>* names) {
  names->clear();
  OptDone done;
  nbd_list_callback list = {.callback = ListCallback,
                            .user_data = names,
                            .free = nullptr};
  nbd_completion_callback completion = {.callback = OptCompletion,
                                        .user_data = &done,
                                        .free = nullptr};
  if (nbd_aio_opt_list(h, list, completion) == -1) return LastErrno();
  auto deadline = Clock::now() + kNbdTimeout;
  while (!done.done) {
    if (Clock::now() >= deadline) return ETIMEDOUT;
    if (nbd_poll(h, RemainingMs(deadline)) == -1) return LastErrno();
  }
  return done.error;
}

std::vector<std::byte> Pattern(size_t n, uint64_t seed) {
  std::vector<std::byte> out(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    if (i % 8 == 0) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
    }
    out[i] = static_cast<std::byte>(x >> (8 * (i % 8)));
  }
  return out;
}

}  // namespace blockrelay::testutil
