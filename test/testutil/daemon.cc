#include "testutil/daemon.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#include "blockrelay/control/control_client.h"

namespace blockrelay::testutil {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(5);

// In the child after fork(): only async-signal-safe calls from here on.
[[noreturn]] void ExecChild(const std::vector<char*>& argv, int out_fd,
                            int err_fd) {
  // Die with the test binary, so a crashed test leaves no daemon behind.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::signal(SIGPIPE, SIG_DFL);
  int devnull = ::open("/dev/null", O_RDONLY);
  if (devnull >= 0) ::dup2(devnull, 0);
  ::dup2(out_fd, 1);
  ::dup2(err_fd, 2);
  // Sockets of other tests' connections must not leak into the daemon.
  ::close_range(3, ~0U, 0);
  ::execv(argv[0], argv.data());
  const char msg[] = "exec of blockrelay failed\n";
  [[maybe_unused]] auto n = ::write(2, msg, sizeof msg - 1);
  ::_exit(127);
}

std::vector<char*> MakeArgv(std::vector<std::string>& storage) {
  std::vector<char*> argv;
  for (auto& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  return argv;
}

// waitpid() with WNOHANG until `deadline`; the wait status or nullopt.
std::optional<int> ReapUntil(pid_t pid, Clock::time_point deadline) {
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return std::nullopt;  // not our child
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(kPollInterval);
  }
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TempDir::TempDir(const std::string& prefix) {
  std::string pattern =
      (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error(
        fmt::format("mkdtemp {}: {}", pattern, std::strerror(errno)));
  }
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

uint16_t PickFreeTcpPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("bind to 127.0.0.1:0 failed");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

bool WaitUntil(const std::function<bool()>& condition,
               std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (condition()) return true;
    if (Clock::now() >= deadline) return condition();
    std::this_thread::sleep_for(kPollInterval);
  }
}

ProcessResult RunBlockrelay(const std::vector<std::string>& args,
                            std::chrono::milliseconds timeout) {
  ProcessResult result;
  std::vector<std::string> storage = {BLOCKRELAY_BINARY};
  storage.insert(storage.end(), args.begin(), args.end());
  auto argv = MakeArgv(storage);
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return result;
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    return result;
  }
  pid_t pid = ::fork();
  if (pid == 0) ExecChild(argv, out_pipe[1], err_pipe[1]);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (pid < 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    return result;
  }
  auto deadline = Clock::now() + timeout;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      break;
    }
    int rc = ::poll(fds, 2, static_cast<int>(left.count()));
    if (rc < 0 && errno == EINTR) continue;
    if (rc <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        sinks[i]->append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  if (result.timed_out) ::kill(pid, SIGKILL);
  auto status = ReapUntil(pid, Clock::now() + std::chrono::seconds(5));
  if (!status) {
    ::kill(pid, SIGKILL);
    status = ReapUntil(pid, Clock::now() + std::chrono::seconds(5));
  }
  if (status && WIFEXITED(*status) && !result.timed_out) {
    result.exited = true;
    result.exit_code = WEXITSTATUS(*status);
  } else if (status && WIFSIGNALED(*status)) {
    result.signal = WTERMSIG(*status);
  }
  return result;
}

nlohmann::json SingleSiteConfig(const fs::path& dir, const std::string& site,
                                uint64_t size_bytes, bool tcp) {
  nlohmann::json nbd = {{"unix_socket", (dir / "nbd.sock").string()}};
  if (tcp) nbd["listen"] = "127.0.0.1:0";
  return {
      {"site", site},
      {"data_dir", (dir / "data").string()},
      {"control_socket", (dir / "control.sock").string()},
      {"nbd", nbd},
      {"groups",
       nlohmann::json::array(
           {{{"name", "g"},
             {"role", "primary"},
             {"volumes", nlohmann::json::array(
                             {{{"name", "data"},
                               {"path", (dir / "data.img").string()},
                               {"size", size_bytes}}})}}})},
  };
}

TestDaemon::TestDaemon(fs::path dir, nlohmann::json config)
    : dir_(std::move(dir)), config_(std::move(config)) {}

TestDaemon::~TestDaemon() {
  if (pid_ > 0 && !wait_status_) {
    ::kill(pid_, SIGKILL);
    wait_status_ = ReapUntil(pid_, Clock::now() + std::chrono::seconds(5));
  }
}

void TestDaemon::AssignPorts(nlohmann::json& doc, const std::string& pointer) {
  if (doc.is_object()) {
    for (auto& [key, value] : doc.items()) {
      AssignPorts(value, pointer + "/" + key);
    }
  } else if (doc.is_array()) {
    for (size_t i = 0; i < doc.size(); ++i) {
      AssignPorts(doc[i], pointer + "/" + std::to_string(i));
    }
  } else if (doc.is_string() && doc.get<std::string>() == "127.0.0.1:0" &&
             pointer.size() >= 7 &&
             pointer.compare(pointer.size() - 7, 7, "/listen") == 0) {
    // A restart keeps the ports of the previous start, so peers that were
    // given them can reconnect.
    auto it = ports_.find(pointer);
    uint16_t port = it != ports_.end() ? it->second : PickFreeTcpPort();
    doc = fmt::format("127.0.0.1:{}", port);
    ports_[pointer] = port;
  }
}

Status TestDaemon::Start(std::chrono::milliseconds timeout) {
  if (running()) {
    return Status::InvalidArgument("TestDaemon::Start: already running");
  }
  auto deadline = Clock::now() + timeout;
  Status last;
  for (int attempt = 0; attempt < 5; ++attempt) {
    bool port_clash = false;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    last = SpawnOnce(left, &port_clash);
    if (last.ok() || !port_clash) return last;
    ports_.clear();  // one of them was taken: pick new ones
  }
  return last;
}

Status TestDaemon::SpawnOnce(std::chrono::milliseconds timeout,
                             bool* port_clash) {
  resolved_ = config_;
  AssignPorts(resolved_, "");
  {
    std::ofstream out(config_path(), std::ios::trunc);
    out << resolved_.dump(2) << "\n";
    if (!out) return Status::IOError("cannot write " + config_path().string());
  }
  // The log accumulates over restarts; this start's part begins here.
  int log_fd = ::open(log_path().c_str(),
                      O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return PosixError("open " + log_path().string(), errno);
  const size_t log_start = ReadLog().size();
  std::vector<std::string> storage = {BLOCKRELAY_BINARY, "run", "--config",
                                      config_path().string()};
  auto argv = MakeArgv(storage);
  wait_status_.reset();
  pid_ = ::fork();
  if (pid_ == 0) ExecChild(argv, log_fd, log_fd);
  int fork_errno = errno;
  ::close(log_fd);
  if (pid_ < 0) return PosixError("fork", fork_errno);

  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (!running()) {
      std::string log = ReadLog();
      *port_clash = log.find("Address already in use", log_start) !=
                    std::string::npos;
      return Status::Aborted(fmt::format(
          "blockrelay exited during start-up (wait status {}); log:\n{}",
          wait_status_.value_or(-1), log));
    }
    auto reply = control::Call(control_socket(), {{"command", "status"}},
                               std::chrono::milliseconds(500));
    if (reply.ok() && reply->value("ok", false)) return Status::OK();
    if (Clock::now() >= deadline) {
      ::kill(pid_, SIGKILL);
      wait_status_ = ReapUntil(pid_, Clock::now() + std::chrono::seconds(5));
      return Status::IOError(fmt::format(
          "blockrelay did not answer on {} in time; log:\n{}",
          control_socket().string(), ReadLog()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

bool TestDaemon::running() {
  if (pid_ <= 0 || wait_status_) return false;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    wait_status_ = status;
    return false;
  }
  return r == 0;
}

bool TestDaemon::Signal(int signo) {
  if (!running()) return false;
  return ::kill(pid_, signo) == 0;
}

std::optional<int> TestDaemon::WaitForExit(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return std::nullopt;
  if (!wait_status_) wait_status_ = ReapUntil(pid_, Clock::now() + timeout);
  return wait_status_;
}

std::optional<int> TestDaemon::Stop(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return std::nullopt;
  Signal(SIGTERM);
  auto status = WaitForExit(timeout);
  if (!status) {
    ::kill(pid_, SIGKILL);
    wait_status_ = ReapUntil(pid_, Clock::now() + std::chrono::seconds(5));
    return std::nullopt;
  }
  if (WIFEXITED(*status)) return WEXITSTATUS(*status);
  return std::nullopt;
}

std::string TestDaemon::ReadLog() const { return ReadFile(log_path()); }

fs::path TestDaemon::control_socket() const {
  const auto& doc = resolved_.is_null() ? config_ : resolved_;
  return doc.at("control_socket").get<std::string>();
}

std::optional<fs::path> TestDaemon::nbd_unix_socket() const {
  const auto& doc = resolved_.is_null() ? config_ : resolved_;
  if (!doc.contains("nbd") || !doc["nbd"].contains("unix_socket")) {
    return std::nullopt;
  }
  return fs::path(doc["nbd"]["unix_socket"].get<std::string>());
}

uint16_t TestDaemon::port(const std::string& json_pointer) const {
  auto it = ports_.find(json_pointer);
  return it == ports_.end() ? 0 : it->second;
}

std::string TestDaemon::NbdUnixUri(const std::string& export_name) const {
  return fmt::format("nbd+unix:///{}?socket={}", export_name,
                     nbd_unix_socket().value_or("").string());
}

Result<nlohmann::json> TestDaemon::Control(
    const nlohmann::json& request, std::chrono::milliseconds timeout) const {
  return control::Call(control_socket(), request, timeout);
}

}  // namespace blockrelay::testutil
