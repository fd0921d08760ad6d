// link_proxy: a TCP proxy that stands for the WAN link between two
// blockrelay sites in tests. It adds a one-way delay and a bandwidth limit
// to each direction, and a control socket can cut the link and heal it.
//
//   link_proxy --listen 127.0.0.1:PORT --target 127.0.0.1:PORT
//              [--delay-ms N] [--rate BYTES_PER_SEC]
//              [--control PATH_TO_UNIX_SOCKET] [--port-file FILE]
//
// --listen may use port 0; the chosen port is then written to --port-file
// (written atomically, once the proxy listens and its control socket is
// ready, so a test can wait for the file). Every accepted connection gets
// its own connection to --target, and bytes are pumped both ways.
//
// Each direction of a connection is one pipe: a reader coroutine reads a
// chunk, waits for the direction's token bucket (the bandwidth limit, shared
// by all connections in that direction, like one link), stamps the chunk
// with "now + delay" and queues it; a writer coroutine writes the queued
// chunks in order, each when its time comes. Many chunks are in flight at
// once, so the delay adds latency without capping throughput at
// chunk/delay. The queue is bounded (kMaxQueuedBytes): a full queue stops
// the reader, and TCP pushes back on the sender. EOF is queued like a chunk
// and becomes a half-close (shutdown(send)) on the other side.
//
// Control socket: newline-terminated text commands, one reply line each.
//   cut        close all connections now (RST to both sides, queued data is
//              dropped) and close new ones at once until heal
//   heal       accept connections again
//   delay MS   one-way delay for chunks read from now on
//   rate BPS   bandwidth limit per direction, 0 = unlimited
//   stats      one JSON line: counters, active connections, cut state
// Anything else gets "error: unknown command X".
//
// Threads: one io_context thread runs everything, so nothing is locked.
// Every asynchronous operation completes with an error code (as_tuple):
// resets and refusals by peers close the connection and are logged, never
// thrown. SIGTERM/SIGINT close everything and exit 0. Exit 2 on bad usage,
// 1 if it cannot listen.
#include <signal.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <asio.hpp>
#include <asio/experimental/as_tuple.hpp>

namespace blockrelay::link_proxy {
namespace {

using asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using Local = asio::local::stream_protocol;

constexpr auto kTuple = asio::experimental::as_tuple(asio::use_awaitable);

constexpr size_t kMaxChunkBytes = 64 << 10;
constexpr size_t kMinRateChunkBytes = 256;
// Bytes queued per pipe before its reader stops reading.
constexpr size_t kMaxQueuedBytes = 16 << 20;
// The token bucket lets this many bytes through at once after idle time.
constexpr uint64_t kBurstBytes = 64 << 10;
// A reader waiting for the bucket looks at rate changes this often.
constexpr auto kRateRecheck = std::chrono::milliseconds(100);
constexpr size_t kMaxControlLineBytes = 4096;
constexpr uint64_t kMaxDelayMs = 3600 * 1000;

enum Direction { kClientToTarget = 0, kTargetToClient = 1 };
constexpr std::array<const char*, 2> kDirectionName = {"client->target",
                                                       "target->client"};

const Clock::time_point kStartTime = Clock::now();

// One line on stderr: "link_proxy[pid] +12.345s: message".
__attribute__((format(printf, 1, 2))) void Log(const char* format, ...) {
  char message[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof message, format, args);
  va_end(args);
  double elapsed_s =
      std::chrono::duration<double>(Clock::now() - kStartTime).count();
  std::fprintf(stderr, "link_proxy[%d] +%.3fs: %s\n", static_cast<int>(getpid()),
               elapsed_s, message);
  std::fflush(stderr);
}

std::string ToString(const tcp::endpoint& endpoint) {
  const auto address = endpoint.address();
  std::string host = address.to_string();
  if (address.is_v6()) host = "[" + host + "]";
  return host + ":" + std::to_string(endpoint.port());
}

std::string RemoteOf(const tcp::socket& socket) {
  asio::error_code ec;
  auto endpoint = socket.remote_endpoint(ec);
  return ec ? std::string("?") : ToString(endpoint);
}

std::optional<uint64_t> ParseUint(std::string_view text) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) {
    return std::nullopt;
  }
  return value;
}

// "127.0.0.1:8000" or "[::1]:8000" (numeric addresses only).
std::optional<tcp::endpoint> ParseEndpoint(std::string_view text) {
  size_t colon = text.rfind(':');
  if (colon == std::string_view::npos) return std::nullopt;
  std::string_view host = text.substr(0, colon);
  auto port = ParseUint(text.substr(colon + 1));
  if (!port || *port > 65535) return std::nullopt;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  asio::error_code ec;
  auto address = asio::ip::make_address(std::string(host), ec);
  if (ec) return std::nullopt;
  return tcp::endpoint(address, static_cast<uint16_t>(*port));
}

// Abortive close: the peer sees a reset, not an orderly EOF.
void CloseSocket(tcp::socket& socket, bool abortive) {
  asio::error_code ec;
  if (!socket.is_open()) return;
  if (abortive) socket.set_option(asio::socket_base::linger(true, 0), ec);
  socket.close(ec);
}

// Completion handler for co_spawn: an escaped exception is a bug in this
// tool; log it instead of losing it.
void LogException(std::exception_ptr e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    Log("internal error: %s", ex.what());
  }
}

// Wakes a coroutine parked in Park(timer); single-threaded, so a notify
// cannot slip in between checking the condition and parking.
asio::awaitable<void> Park(asio::steady_timer& timer) {
  timer.expires_at(Clock::time_point::max());
  co_await timer.async_wait(kTuple);
}
void Wake(asio::steady_timer& timer) { timer.cancel(); }

struct Options {
  tcp::endpoint listen;
  tcp::endpoint target;
  uint64_t delay_ms = 0;
  uint64_t rate_bps = 0;  // 0 = unlimited
  std::string control_path;
  std::string port_file;
};

// A virtual link clock (GCRA): each reservation of n bytes ends n/rate after
// the previous one ends, or after "now - burst" if the link was idle.
// Reservations are served in the order they are made.
class TokenBucket {
 public:
  explicit TokenBucket(uint64_t rate_bps) { SetRate(rate_bps); }

  // Changes the rate; reservations made before no longer count (a reader
  // waiting on one stops waiting, see generation()).
  void SetRate(uint64_t rate_bps) {
    rate_bps_ = rate_bps;
    next_free_ = Clock::now();
    ++generation_;
  }
  uint64_t rate_bps() const { return rate_bps_; }
  uint64_t generation() const { return generation_; }

  // The time point at which n more bytes have passed the link.
  Clock::time_point Reserve(size_t n) {
    auto now = Clock::now();
    if (rate_bps_ == 0) return now;
    auto start = std::max(next_free_, now - BytesToDuration(kBurstBytes));
    next_free_ = start + BytesToDuration(n);
    return next_free_;
  }

  // Read size that keeps a limited link smooth: ~10 ms worth of bytes.
  size_t ChunkBytes() const {
    if (rate_bps_ == 0) return kMaxChunkBytes;
    return std::clamp<uint64_t>(rate_bps_ / 100, kMinRateChunkBytes,
                                kMaxChunkBytes);
  }

 private:
  Clock::duration BytesToDuration(uint64_t bytes) const {
    // bytes <= 64 KiB here, so bytes * 1e9 fits in 64 bits.
    return std::chrono::duration_cast<Clock::duration>(
        std::chrono::nanoseconds(bytes * 1'000'000'000ull / rate_bps_));
  }

  uint64_t rate_bps_ = 0;
  Clock::time_point next_free_;
  uint64_t generation_ = 0;
};

class Proxy;

// One proxied connection: the accepted client socket, the socket to the
// target, and a pipe per direction. Owned by Proxy::connections_ while
// open, and by its own coroutines (they hold a shared_ptr) until they end.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Proxy& proxy, uint64_t id, tcp::socket client);

  // Connects to the target, then starts the pumps.
  void Start();

  // Closes both sockets (abortive: with RST), drops queued data, ends the
  // coroutines and leaves the proxy's table. Idempotent.
  void Close(bool abortive, const std::string& reason);

  uint64_t id() const { return id_; }

 private:
  struct Chunk {
    Clock::time_point release;
    std::vector<char> data;
    bool eof = false;
  };
  struct Pipe {
    Pipe(const asio::any_io_executor& ex, Direction d, tcp::socket& f,
         tcp::socket& t)
        : dir(d), from(f), to(t), reader_wake(ex), writer_wake(ex),
          release_timer(ex), rate_timer(ex) {}
    Direction dir;
    tcp::socket& from;
    tcp::socket& to;
    std::deque<Chunk> queue;
    size_t queued_bytes = 0;  // data bytes in queue
    uint64_t delivered_bytes = 0;
    asio::steady_timer reader_wake;  // queue has room again
    asio::steady_timer writer_wake;  // queue is no longer empty
    asio::steady_timer release_timer;
    asio::steady_timer rate_timer;
  };

  static asio::awaitable<void> Run(std::shared_ptr<Connection> self);
  static asio::awaitable<void> ReadLoop(std::shared_ptr<Connection> self,
                                        Pipe& pipe);
  static asio::awaitable<void> WriteLoop(std::shared_ptr<Connection> self,
                                         Pipe& pipe);

  Proxy& proxy_;
  const uint64_t id_;
  tcp::socket client_;
  tcp::socket target_;
  Pipe up_;    // client -> target
  Pipe down_;  // target -> client
  bool closed_ = false;
  int writers_done_ = 0;  // pipes that delivered their EOF
};

class Proxy {
 public:
  Proxy(asio::io_context& ctx, Options options)
      : ctx_(ctx),
        options_(std::move(options)),
        acceptor_(ctx),
        control_acceptor_(ctx),
        signals_(ctx, SIGINT, SIGTERM),
        buckets_{TokenBucket(options_.rate_bps), TokenBucket(options_.rate_bps)},
        delay_ms_(options_.delay_ms) {}

  // Binds the listener and the control socket, writes the port file.
  // Returns false (after logging why) if any of that fails.
  bool Listen();
  // Starts the accept loops and the signal handler.
  void Start();

  const tcp::endpoint& target() const { return options_.target; }
  uint64_t delay_ms() const { return delay_ms_; }
  TokenBucket& bucket(Direction dir) { return buckets_[dir]; }
  void CountDelivered(Direction dir, size_t n) { delivered_bytes_[dir] += n; }
  void CountConnectFailure() { ++connect_failures_; }
  void Remove(uint64_t id) { connections_.erase(id); }

 private:
  asio::awaitable<void> AcceptLoop();
  asio::awaitable<void> ControlAcceptLoop();
  asio::awaitable<void> ControlSession(std::shared_ptr<Local::socket> socket);
  std::string HandleCommand(std::string_view line);
  std::string StatsJson() const;
  size_t CloseAll(bool abortive, const std::string& reason);
  void Shutdown(int signo);

  asio::io_context& ctx_;
  const Options options_;
  tcp::acceptor acceptor_;
  Local::acceptor control_acceptor_;
  asio::signal_set signals_;
  std::array<TokenBucket, 2> buckets_;
  uint64_t delay_ms_;
  bool cut_ = false;
  bool stopping_ = false;
  uint64_t next_id_ = 0;
  uint64_t accepted_ = 0;
  uint64_t refused_ = 0;
  uint64_t connect_failures_ = 0;
  uint64_t cuts_ = 0;
  std::array<uint64_t, 2> delivered_bytes_{0, 0};
  std::map<uint64_t, std::shared_ptr<Connection>> connections_;
  std::map<Local::socket*, std::weak_ptr<Local::socket>> control_sessions_;
};

// ---- Connection -----------------------------------------------------------

Connection::Connection(Proxy& proxy, uint64_t id, tcp::socket client)
    : proxy_(proxy),
      id_(id),
      client_(std::move(client)),
      target_(client_.get_executor()),
      up_(client_.get_executor(), kClientToTarget, client_, target_),
      down_(client_.get_executor(), kTargetToClient, target_, client_) {}

void Connection::Start() {
  asio::co_spawn(client_.get_executor(), Run(shared_from_this()), LogException);
}

void Connection::Close(bool abortive, const std::string& reason) {
  if (closed_) return;
  closed_ = true;
  CloseSocket(client_, abortive);
  CloseSocket(target_, abortive);
  for (Pipe* pipe : {&up_, &down_}) {
    pipe->reader_wake.cancel();
    pipe->writer_wake.cancel();
    pipe->release_timer.cancel();
    pipe->rate_timer.cancel();
    // The queue stays: an aborted write may still name its front chunk.
    // It goes away with this object, once the coroutines have ended.
  }
  Log("conn %" PRIu64 " closed%s (%s): %" PRIu64 " bytes client->target, %" PRIu64
      " bytes target->client",
      id_, abortive ? " with reset" : "", reason.c_str(), up_.delivered_bytes,
      down_.delivered_bytes);
  proxy_.Remove(id_);  // the coroutines still hold this object
}

asio::awaitable<void> Connection::Run(std::shared_ptr<Connection> self) {
  auto [ec] = co_await self->target_.async_connect(self->proxy_.target(), kTuple);
  if (self->closed_) co_return;
  if (ec) {
    self->proxy_.CountConnectFailure();
    self->Close(true, "connect to target " + ToString(self->proxy_.target()) +
                          " failed: " + ec.message());
    co_return;
  }
  asio::error_code ignored;
  self->target_.set_option(tcp::no_delay(true), ignored);
  asio::error_code local_ec;
  auto local = self->target_.local_endpoint(local_ec);
  Log("conn %" PRIu64 " connected to target %s from %s", self->id_,
      ToString(self->proxy_.target()).c_str(),
      local_ec ? "?" : ToString(local).c_str());
  auto ex = self->client_.get_executor();
  for (Pipe* pipe : {&self->up_, &self->down_}) {
    asio::co_spawn(ex, ReadLoop(self, *pipe), LogException);
    asio::co_spawn(ex, WriteLoop(self, *pipe), LogException);
  }
}

asio::awaitable<void> Connection::ReadLoop(std::shared_ptr<Connection> self,
                                           Pipe& pipe) {
  TokenBucket& bucket = self->proxy_.bucket(pipe.dir);
  for (;;) {
    while (!self->closed_ && pipe.queued_bytes >= kMaxQueuedBytes) {
      co_await Park(pipe.reader_wake);
    }
    if (self->closed_) co_return;
    std::vector<char> data(bucket.ChunkBytes());
    auto [ec, n] = co_await pipe.from.async_read_some(asio::buffer(data), kTuple);
    if (self->closed_) co_return;
    if (ec == asio::error::eof) {
      Log("conn %" PRIu64 " %s: EOF from %s", self->id_, kDirectionName[pipe.dir],
          pipe.dir == kClientToTarget ? "client" : "target");
      auto delay = std::chrono::milliseconds(self->proxy_.delay_ms());
      pipe.queue.push_back({Clock::now() + delay, {}, true});
      Wake(pipe.writer_wake);
      co_return;
    }
    if (ec) {
      self->Close(true, std::string("read from ") +
                            (pipe.dir == kClientToTarget ? "client" : "target") +
                            ": " + ec.message());
      co_return;
    }
    data.resize(n);
    // The chunk has crossed the link once its bytes have been serialized at
    // the link's rate; it arrives one delay after that.
    uint64_t generation = bucket.generation();
    Clock::time_point sent = bucket.Reserve(n);
    while (!self->closed_ && bucket.generation() == generation &&
           Clock::now() < sent) {
      pipe.rate_timer.expires_at(std::min(sent, Clock::now() + kRateRecheck));
      co_await pipe.rate_timer.async_wait(kTuple);
    }
    if (self->closed_) co_return;
    auto delay = std::chrono::milliseconds(self->proxy_.delay_ms());
    pipe.queued_bytes += n;
    pipe.queue.push_back({Clock::now() + delay, std::move(data), false});
    Wake(pipe.writer_wake);
  }
}

asio::awaitable<void> Connection::WriteLoop(std::shared_ptr<Connection> self,
                                            Pipe& pipe) {
  for (;;) {
    while (!self->closed_ && pipe.queue.empty()) co_await Park(pipe.writer_wake);
    if (self->closed_) co_return;
    // References into a deque stay valid across push_back by the reader.
    Chunk& chunk = pipe.queue.front();
    if (Clock::now() < chunk.release) {
      pipe.release_timer.expires_at(chunk.release);
      co_await pipe.release_timer.async_wait(kTuple);
      continue;  // closed_ may have changed
    }
    if (chunk.eof) {
      pipe.queue.pop_front();
      asio::error_code ignored;
      pipe.to.shutdown(tcp::socket::shutdown_send, ignored);
      Log("conn %" PRIu64 " %s: half-closed towards %s", self->id_,
          kDirectionName[pipe.dir],
          pipe.dir == kClientToTarget ? "target" : "client");
      if (++self->writers_done_ == 2) self->Close(false, "both sides done");
      co_return;
    }
    auto [ec, n] = co_await asio::async_write(pipe.to, asio::buffer(chunk.data),
                                              kTuple);
    if (self->closed_) co_return;
    if (ec) {
      self->Close(true, std::string("write to ") +
                            (pipe.dir == kClientToTarget ? "target" : "client") +
                            ": " + ec.message());
      co_return;
    }
    pipe.delivered_bytes += n;
    self->proxy_.CountDelivered(pipe.dir, n);
    pipe.queued_bytes -= chunk.data.size();
    pipe.queue.pop_front();
    Wake(pipe.reader_wake);
  }
}

// ---- Proxy ----------------------------------------------------------------

bool Proxy::Listen() {
  asio::error_code ec;
  acceptor_.open(options_.listen.protocol(), ec);
  if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor_.bind(options_.listen, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    Log("cannot listen on %s: %s", ToString(options_.listen).c_str(),
        ec.message().c_str());
    return false;
  }
  auto bound = acceptor_.local_endpoint(ec);
  if (ec) {
    Log("cannot read the listening address: %s", ec.message().c_str());
    return false;
  }

  if (!options_.control_path.empty()) {
    std::error_code fs_ec;
    if (std::filesystem::is_socket(options_.control_path, fs_ec)) {
      std::filesystem::remove(options_.control_path, fs_ec);  // stale socket
    }
    control_acceptor_.open(Local(), ec);
    if (!ec) control_acceptor_.bind(Local::endpoint(options_.control_path), ec);
    if (!ec) control_acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      Log("cannot listen on control socket %s: %s", options_.control_path.c_str(),
          ec.message().c_str());
      return false;
    }
  }

  if (!options_.port_file.empty()) {
    // Write then rename: a reader never sees a partial port number.
    std::string tmp = options_.port_file + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    bool ok = f != nullptr && std::fprintf(f, "%u\n", bound.port()) > 0;
    if (f != nullptr && std::fclose(f) != 0) ok = false;
    if (!ok || std::rename(tmp.c_str(), options_.port_file.c_str()) != 0) {
      Log("cannot write port file %s: %s", options_.port_file.c_str(),
          std::strerror(errno));
      return false;
    }
  }
  Log("listening on %s, target %s, delay %" PRIu64 " ms, rate %" PRIu64
      " B/s%s%s",
      ToString(bound).c_str(), ToString(options_.target).c_str(), delay_ms_,
      buckets_[0].rate_bps(), options_.control_path.empty() ? "" : ", control ",
      options_.control_path.c_str());
  return true;
}

void Proxy::Start() {
  asio::co_spawn(ctx_, AcceptLoop(), LogException);
  if (control_acceptor_.is_open()) {
    asio::co_spawn(ctx_, ControlAcceptLoop(), LogException);
  }
  signals_.async_wait([this](const asio::error_code& ec, int signo) {
    if (!ec) Shutdown(signo);
  });
}

asio::awaitable<void> Proxy::AcceptLoop() {
  asio::steady_timer backoff(ctx_);
  while (!stopping_) {
    auto [ec, socket] = co_await acceptor_.async_accept(kTuple);
    if (stopping_) break;
    if (ec) {
      if (ec == asio::error::operation_aborted) break;
      Log("accept failed: %s", ec.message().c_str());
      backoff.expires_after(std::chrono::milliseconds(100));  // e.g. EMFILE
      co_await backoff.async_wait(kTuple);
      continue;
    }
    std::string peer = RemoteOf(socket);
    if (cut_) {
      ++refused_;
      Log("connection from %s refused: link is cut", peer.c_str());
      CloseSocket(socket, true);
      continue;
    }
    ++accepted_;
    uint64_t id = ++next_id_;
    asio::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    Log("conn %" PRIu64 " accepted from %s", id, peer.c_str());
    auto connection = std::make_shared<Connection>(*this, id, std::move(socket));
    connections_.emplace(id, connection);
    connection->Start();
  }
}

asio::awaitable<void> Proxy::ControlAcceptLoop() {
  while (!stopping_) {
    auto [ec, socket] = co_await control_acceptor_.async_accept(kTuple);
    if (stopping_ || ec == asio::error::operation_aborted) break;
    if (ec) {
      Log("control accept failed: %s", ec.message().c_str());
      continue;
    }
    auto shared = std::make_shared<Local::socket>(std::move(socket));
    control_sessions_.emplace(shared.get(), shared);
    asio::co_spawn(ctx_, ControlSession(shared), LogException);
  }
}

asio::awaitable<void> Proxy::ControlSession(std::shared_ptr<Local::socket> socket) {
  asio::streambuf buffer(kMaxControlLineBytes);
  for (;;) {
    auto [ec, n] = co_await asio::async_read_until(*socket, buffer, '\n', kTuple);
    std::string reply;
    bool close_after = false;
    if (ec == asio::error::not_found) {
      reply = "error: command line longer than " +
              std::to_string(kMaxControlLineBytes) + " bytes";
      close_after = true;
    } else if (ec) {
      break;  // client closed, or shutting down
    } else {
      std::string line(asio::buffers_begin(buffer.data()),
                       asio::buffers_begin(buffer.data()) + n - 1);
      buffer.consume(n);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      reply = HandleCommand(line);
    }
    reply += '\n';
    auto [wec, wn] = co_await asio::async_write(*socket, asio::buffer(reply), kTuple);
    if (wec || close_after) break;
  }
  asio::error_code ignored;
  socket->close(ignored);
  control_sessions_.erase(socket.get());
}

std::string Proxy::HandleCommand(std::string_view line) {
  auto first = line.find_first_not_of(' ');
  line = first == std::string_view::npos ? std::string_view() : line.substr(first);
  auto space = line.find(' ');
  std::string_view command = line.substr(0, space);
  std::string_view arg;
  if (space != std::string_view::npos) {
    arg = line.substr(space + 1);
    auto last = arg.find_last_not_of(' ');
    arg = last == std::string_view::npos ? std::string_view() : arg.substr(0, last + 1);
    auto start = arg.find_first_not_of(' ');
    arg = start == std::string_view::npos ? std::string_view() : arg.substr(start);
  }
  if (command.empty()) return "error: empty command";
  bool takes_no_arg = command == "cut" || command == "heal" || command == "stats";
  if (takes_no_arg && !arg.empty()) {
    return "error: " + std::string(command) + " takes no argument";
  }

  if (command == "cut") {
    cut_ = true;
    ++cuts_;
    size_t n = CloseAll(true, "link cut");
    Log("control: cut, %zu connection(s) closed", n);
    return "ok cut, " + std::to_string(n) + " connection(s) closed";
  }
  if (command == "heal") {
    cut_ = false;
    Log("control: heal");
    return "ok healed";
  }
  if (command == "delay") {
    auto ms = ParseUint(arg);
    if (!ms || *ms > kMaxDelayMs) {
      return "error: delay wants milliseconds 0.." + std::to_string(kMaxDelayMs) +
             ", got '" + std::string(arg) + "'";
    }
    delay_ms_ = *ms;
    Log("control: delay %" PRIu64 " ms", delay_ms_);
    return "ok delay_ms " + std::to_string(delay_ms_);
  }
  if (command == "rate") {
    auto bps = ParseUint(arg);
    if (!bps) {
      return "error: rate wants bytes per second (0 = unlimited), got '" +
             std::string(arg) + "'";
    }
    for (auto& bucket : buckets_) bucket.SetRate(*bps);
    Log("control: rate %" PRIu64 " B/s", *bps);
    return "ok rate_bps " + std::to_string(*bps);
  }
  if (command == "stats") return StatsJson();
  return "error: unknown command " + std::string(command);
}

std::string Proxy::StatsJson() const {
  char json[512];
  std::snprintf(json, sizeof json,
                "{\"accepted\":%" PRIu64 ",\"active\":%zu,\"refused\":%" PRIu64
                ",\"connect_failures\":%" PRIu64 ",\"cuts\":%" PRIu64
                ",\"bytes_client_to_target\":%" PRIu64
                ",\"bytes_target_to_client\":%" PRIu64
                ",\"cut\":%s,\"delay_ms\":%" PRIu64 ",\"rate_bps\":%" PRIu64 "}",
                accepted_, connections_.size(), refused_, connect_failures_, cuts_,
                delivered_bytes_[kClientToTarget],
                delivered_bytes_[kTargetToClient], cut_ ? "true" : "false",
                delay_ms_, buckets_[0].rate_bps());
  return json;
}

size_t Proxy::CloseAll(bool abortive, const std::string& reason) {
  // Close() erases from connections_: iterate over a copy.
  auto connections = connections_;
  for (auto& [id, connection] : connections) connection->Close(abortive, reason);
  return connections.size();
}

void Proxy::Shutdown(int signo) {
  Log("signal %d: closing everything and exiting", signo);
  stopping_ = true;
  asio::error_code ignored;
  acceptor_.close(ignored);
  if (control_acceptor_.is_open()) {
    control_acceptor_.close(ignored);
    std::error_code fs_ec;
    std::filesystem::remove(options_.control_path, fs_ec);
  }
  for (auto& [raw, weak] : control_sessions_) {
    if (auto socket = weak.lock()) socket->close(ignored);
  }
  CloseAll(false, "shutting down");
  ctx_.stop();
}

// ---- main -----------------------------------------------------------------

constexpr const char* kUsage =
    "usage: link_proxy --listen HOST:PORT --target HOST:PORT [--delay-ms N]\n"
    "                  [--rate BYTES_PER_SEC] [--control UNIX_SOCKET_PATH]\n"
    "                  [--port-file FILE]\n"
    "A TCP proxy with a one-way delay and a bandwidth limit per direction.\n"
    "HOST is a numeric address. With port 0 on --listen the chosen port is\n"
    "written to --port-file. Control socket commands, one per line:\n"
    "cut, heal, delay MS, rate BPS (0 = unlimited), stats.\n";

int UsageError(const std::string& message) {
  std::fprintf(stderr, "link_proxy: %s\n%s", message.c_str(), kUsage);
  return 2;
}

int Main(int argc, char** argv) {
  Options options;
  bool have_listen = false, have_target = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (auto eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag.resize(eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return UsageError(flag + " needs a value");
    }
    if (flag == "--listen" || flag == "--target") {
      auto endpoint = ParseEndpoint(value);
      if (!endpoint) return UsageError("bad address for " + flag + ": " + value);
      if (flag == "--listen") {
        options.listen = *endpoint;
        have_listen = true;
      } else {
        options.target = *endpoint;
        have_target = true;
      }
    } else if (flag == "--delay-ms") {
      auto ms = ParseUint(value);
      if (!ms || *ms > kMaxDelayMs) return UsageError("bad --delay-ms: " + value);
      options.delay_ms = *ms;
    } else if (flag == "--rate") {
      auto bps = ParseUint(value);
      if (!bps) return UsageError("bad --rate: " + value);
      options.rate_bps = *bps;
    } else if (flag == "--control") {
      options.control_path = value;
    } else if (flag == "--port-file") {
      options.port_file = value;
    } else {
      return UsageError("unknown option " + flag);
    }
  }
  if (!have_listen || !have_target) {
    return UsageError("--listen and --target are required");
  }

  ::signal(SIGPIPE, SIG_IGN);
  asio::io_context ctx(1);
  Proxy proxy(ctx, std::move(options));
  if (!proxy.Listen()) return 1;
  proxy.Start();
  ctx.run();
  Log("exited");
  return 0;
}

}  // namespace
}  // namespace blockrelay::link_proxy

int main(int argc, char** argv) {
  return blockrelay::link_proxy::Main(argc, argv);
}
