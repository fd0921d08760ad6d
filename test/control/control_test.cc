// The control socket and the CLI against the real daemon, plus unit tests of
// the status formatting (src/control/status_format.h).
#include <sys/stat.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "control/status_format.h"
#include "testutil/daemon.h"
#include "testutil/nbd_client.h"
#include "testutil/nbd_raw_client.h"

namespace blockrelay::control {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Catch::Matchers::Contains;
using testutil::ProcessResult;
using testutil::RawSocket;
using testutil::RunBlockrelay;

constexpr uint64_t kVolumeBytes = 16ull << 20;

// Reads one '\n'-terminated line (without the newline); fails the test on
// EOF or timeout.
std::string ReadLine(RawSocket& s) {
  std::string line;
  for (;;) {
    auto byte = s.ReadExact(1);
    INFO(byte.status().ToString() << " after \"" << line << "\"");
    REQUIRE(byte.ok());
    char c = static_cast<char>((*byte)[0]);
    if (c == '\n') return line;
    line.push_back(c);
    REQUIRE(line.size() < (4u << 20));
  }
}

json ParseLine(const std::string& line) {
  json j = json::parse(line, nullptr, false);
  INFO("reply line: " << line);
  REQUIRE_FALSE(j.is_discarded());
  REQUIRE(j.is_object());
  return j;
}

class ControlTest {
 public:
  ControlTest()
      : daemon_(dir_.path(),
                testutil::SingleSiteConfig(dir_.path(), "ctl-site",
                                           kVolumeBytes, /*tcp=*/false)) {}

 protected:
  void Start() {
    Status s = daemon_.Start();
    INFO(s.ToString());
    REQUIRE(s.ok());
  }
  void StopCleanly() {
    auto rc = daemon_.Stop();
    INFO("daemon log:\n" << daemon_.ReadLog());
    REQUIRE(rc.has_value());
    CHECK(*rc == 0);
  }
  json Call(const json& request) {
    auto reply = daemon_.Control(request);
    INFO(reply.status().ToString());
    REQUIRE(reply.ok());
    return *reply;
  }
  RawSocket Connect() {
    auto s = RawSocket::ConnectUnix(daemon_.control_socket());
    INFO(s.status().ToString());
    REQUIRE(s.ok());
    return std::move(s).value();
  }
  // One raw line in, one parsed reply out, on connection `s`.
  json Exchange(RawSocket& s, const std::string& line) {
    REQUIRE(s.SendAll(line + "\n").ok());
    return ParseLine(ReadLine(s));
  }

  testutil::TempDir dir_{"blockrelay-ctl"};
  testutil::TestDaemon daemon_;
};

// --- Requests ------------------------------------------------------------------

TEST_CASE_METHOD(ControlTest,
                 "Control: status names the site and reports uptime",
                 "[control]") {
  Start();
  json r = Call({{"command", "status"}});
  CHECK(r["ok"] == true);
  CHECK(r["site"] == "ctl-site");
  REQUIRE(r["uptime_seconds"].is_number_integer());
  CHECK(r["uptime_seconds"].get<int64_t>() >= 0);
  CHECK(r["uptime_seconds"].get<int64_t>() < 60);
  CHECK(r["pid"] == daemon_.pid());
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: status lists every volume with size, role, backing, "
                 "clients and traffic",
                 "[control]") {
  Start();
  json r = Call({{"command", "status"}});
  REQUIRE(r["groups"].is_array());
  REQUIRE(r["groups"].size() == 1);
  const json& g = r["groups"][0];
  CHECK(g["name"] == "g");
  CHECK(g["role"] == "primary");
  REQUIRE(g["volumes"].size() == 1);
  const json& v = g["volumes"][0];
  CHECK(v["name"] == "data");
  CHECK(v["size_bytes"] == kVolumeBytes);
  CHECK(v["role"] == "primary");
  CHECK(v["backing"] == (dir_.path() / "data.img").string());
  CHECK(v["nbd_clients"] == 0);
  CHECK(v["bytes_read"] == 0);
  CHECK(v["bytes_written"] == 0);
  CHECK(v["read_only"] == false);
  CHECK_FALSE(v.contains("error"));
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest, "Control: status counts NBD traffic",
                 "[control]") {
  Start();
  std::string error;
  auto h = testutil::ConnectUnix(*daemon_.nbd_unix_socket(), {}, &error);
  INFO(error);
  REQUIRE(h != nullptr);
  REQUIRE(testutil::Pwrite(h.get(), testutil::Pattern(12288, 1), 0) == 0);
  std::vector<std::byte> buf(4096);
  REQUIRE(testutil::Pread(h.get(), buf, 0) == 0);
  json v = Call({{"command", "status"}})["groups"][0]["volumes"][0];
  CHECK(v["bytes_written"] == 12288);
  CHECK(v["bytes_read"] == 4096);
  CHECK(v["nbd_clients"] == 1);
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest, "Control: version reports the build's version",
                 "[control]") {
  Start();
  json r = Call({{"command", "version"}});
  CHECK(r["ok"] == true);
  CHECK(r["version"] == BLOCKRELAY_VERSION);
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: an unknown command gets ok=false with an error "
                 "naming it",
                 "[control]") {
  Start();
  json r = Call({{"command", "frobnicate"}});
  CHECK(r["ok"] == false);
  REQUIRE(r["error"].is_string());
  CHECK_THAT(r["error"].get<std::string>(), Contains("frobnicate"));
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: malformed JSON gets an error and the connection "
                 "stays usable",
                 "[control]") {
  Start();
  RawSocket s = Connect();
  json bad = Exchange(s, R"({"command": "status")");
  CHECK(bad["ok"] == false);
  CHECK(bad["error"].is_string());
  json good = Exchange(s, R"({"command": "status"})");
  CHECK(good["ok"] == true);
  CHECK(good["site"] == "ctl-site");
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: an empty line gets an error and the connection "
                 "stays usable",
                 "[control]") {
  Start();
  RawSocket s = Connect();
  CHECK(Exchange(s, "")["ok"] == false);
  CHECK(Exchange(s, R"({"command":"version"})")["ok"] == true);
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: JSON that is not an object gets an error",
                 "[control]") {
  Start();
  RawSocket s = Connect();
  for (const char* line : {"[1, 2]", "\"status\"", "42", "null", "true"}) {
    INFO(line);
    json r = Exchange(s, line);
    CHECK(r["ok"] == false);
    CHECK(r["error"].is_string());
  }
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: a request without a string \"command\" gets an error",
                 "[control]") {
  Start();
  RawSocket s = Connect();
  for (const char* line : {"{}", R"({"cmd": "status"})", R"({"command": 5})",
                           R"({"command": null})", R"({"command": ["status"]})"}) {
    INFO(line);
    json r = Exchange(s, line);
    CHECK(r["ok"] == false);
    CHECK_THAT(r["error"].get<std::string>(), Contains("command"));
  }
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: requests pipelined on one connection are answered "
                 "in order",
                 "[control]") {
  Start();
  RawSocket s = Connect();
  REQUIRE(s.SendAll("{\"command\":\"version\"}\n{\"command\":\"nope\"}\n"
                    "{\"command\":\"status\"}\n")
              .ok());
  json first = ParseLine(ReadLine(s));
  json second = ParseLine(ReadLine(s));
  json third = ParseLine(ReadLine(s));
  CHECK(first.contains("version"));
  CHECK(second["ok"] == false);
  CHECK(third["site"] == "ctl-site");
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: a line over 1 MiB gets an error and the connection "
                 "is closed",
                 "[control]") {
  Start();
  RawSocket s = Connect();
  std::string huge = "{\"command\":\"" + std::string(1536 * 1024, 'x');
  // The server stops reading at 1 MiB, so the send may fail part way.
  s.SendAll(huge, std::chrono::seconds(5)).IgnoreError();
  json r = ParseLine(ReadLine(s));
  CHECK(r["ok"] == false);
  CHECK_THAT(r["error"].get<std::string>(), Contains("longer"));
  CHECK(s.WaitForClose());
  // The daemon still serves others.
  CHECK(Call({{"command", "version"}})["ok"] == true);
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "Control: a client that connects and sends nothing does not "
                 "block other clients",
                 "[control]") {
  Start();
  RawSocket silent = Connect();
  RawSocket half = Connect();
  REQUIRE(half.SendAll(R"({"command": "sta)").ok());  // no newline, ever
  auto t0 = std::chrono::steady_clock::now();
  auto reply = daemon_.Control({{"command", "status"}},
                               std::chrono::seconds(2));
  REQUIRE(reply.ok());
  CHECK((*reply)["ok"] == true);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  // Shutdown is not held up by them either.
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest, "Control: the control socket has mode 0660",
                 "[control]") {
  Start();
  struct stat st {};
  REQUIRE(::stat(daemon_.control_socket().c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0660);
  StopCleanly();
}

// --- CLI -------------------------------------------------------------------------

TEST_CASE_METHOD(ControlTest,
                 "CLI: status --config prints a table with the volume",
                 "[control]") {
  Start();
  ProcessResult r =
      RunBlockrelay({"status", "--config", daemon_.config_path().string()});
  INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
  REQUIRE(r.exited);
  CHECK(r.exit_code == 0);
  CHECK_THAT(r.out, Contains("ctl-site"));
  CHECK_THAT(r.out, Contains("VOLUME"));
  CHECK_THAT(r.out, Contains("data"));
  CHECK_THAT(r.out, Contains("16.0 MiB"));
  CHECK_THAT(r.out, Contains("primary"));
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest, "CLI: status --json prints parseable JSON",
                 "[control]") {
  Start();
  for (const auto& args :
       {std::vector<std::string>{"status", "--json", "--config",
                                 daemon_.config_path().string()},
        std::vector<std::string>{"status", "--socket",
                                 daemon_.control_socket().string(), "--json"}}) {
    ProcessResult r = RunBlockrelay(args);
    INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
    REQUIRE(r.exited);
    CHECK(r.exit_code == 0);
    json j = json::parse(r.out, nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    CHECK(j["ok"] == true);
    CHECK(j["site"] == "ctl-site");
    CHECK(j["groups"][0]["volumes"][0]["name"] == "data");
  }
  StopCleanly();
}

TEST_CASE_METHOD(ControlTest,
                 "CLI: status exits 1 when the daemon is not running",
                 "[control]") {
  // A valid config whose daemon was never started.
  std::ofstream(daemon_.config_path())
      << testutil::SingleSiteConfig(dir_.path(), "ctl-site", kVolumeBytes,
                                    false)
             .dump();
  ProcessResult r =
      RunBlockrelay({"status", "--config", daemon_.config_path().string()});
  INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
  REQUIRE(r.exited);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.err, Contains("control.sock"));
  CHECK(r.out.empty());

  ProcessResult s = RunBlockrelay(
      {"status", "--socket", (dir_.path() / "nothing.sock").string()});
  REQUIRE(s.exited);
  CHECK(s.exit_code == 1);
}

TEST_CASE("CLI: status with a bad config exits 2", "[control]") {
  testutil::TempDir dir("blockrelay-cli");
  fs::path bad = dir / "bad.json";
  std::ofstream(bad) << "{ \"site\": ";
  ProcessResult r = RunBlockrelay({"status", "--config", bad.string()});
  INFO("stderr:\n" << r.err);
  REQUIRE(r.exited);
  CHECK(r.exit_code == 2);
  CHECK_THAT(r.err, Contains("bad.json"));

  ProcessResult missing =
      RunBlockrelay({"status", "--config", (dir / "missing.json").string()});
  REQUIRE(missing.exited);
  CHECK(missing.exit_code == 2);
}

TEST_CASE("CLI: usage errors exit 2", "[control]") {
  const std::vector<std::vector<std::string>> cases = {
      {},                                         // no subcommand
      {"frobnicate"},                             // unknown subcommand
      {"status"},                                 // neither --config nor --socket
      {"status", "--config", "a.json", "--socket", "b.sock"},  // both
      {"status", "--bogus-flag"},
      {"run"},                                    // --config is required
      {"check-config"},                           // file is required
      {"--log-level", "loud", "status", "--socket", "x"},
  };
  for (const auto& args : cases) {
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    INFO("blockrelay " << joined);
    ProcessResult r = RunBlockrelay(args);
    INFO("stderr:\n" << r.err);
    REQUIRE(r.exited);
    CHECK(r.exit_code == 2);
  }
}

TEST_CASE("CLI: check-config exits 0 for a valid config and 2 for a bad one",
          "[control]") {
  testutil::TempDir dir("blockrelay-cli");
  fs::path good = dir / "good.json";
  std::ofstream(good) << testutil::SingleSiteConfig(dir.path(), "a",
                                                    kVolumeBytes, false)
                             .dump();
  ProcessResult ok = RunBlockrelay({"check-config", good.string()});
  INFO("stdout:\n" << ok.out << "\nstderr:\n" << ok.err);
  REQUIRE(ok.exited);
  CHECK(ok.exit_code == 0);
  CHECK_THAT(ok.out, Contains("OK"));
  // check-config changes nothing on disk.
  CHECK_FALSE(fs::exists(dir / "data.img"));

  json invalid = testutil::SingleSiteConfig(dir.path(), "a", 1000, false);
  fs::path bad = dir / "bad.json";
  std::ofstream(bad) << invalid.dump();  // size not a multiple of 512
  ProcessResult r = RunBlockrelay({"check-config", bad.string()});
  INFO("stderr:\n" << r.err);
  REQUIRE(r.exited);
  CHECK(r.exit_code == 2);
  CHECK_THAT(r.err, Contains("size"));

  ProcessResult missing =
      RunBlockrelay({"check-config", (dir / "missing.json").string()});
  REQUIRE(missing.exited);
  CHECK(missing.exit_code == 2);
}

TEST_CASE("CLI: run with a bad config exits 2", "[control]") {
  testutil::TempDir dir("blockrelay-cli");
  fs::path bad = dir / "bad.json";
  std::ofstream(bad) << R"({"site": "a"})";
  ProcessResult r = RunBlockrelay({"run", "--config", bad.string()});
  INFO("stderr:\n" << r.err);
  REQUIRE(r.exited);
  CHECK(r.exit_code == 2);
}

TEST_CASE("CLI: --version prints the version and exits 0", "[control]") {
  ProcessResult r = RunBlockrelay({"--version"});
  REQUIRE(r.exited);
  CHECK(r.exit_code == 0);
  CHECK_THAT(r.out, Contains(BLOCKRELAY_VERSION));
}

TEST_CASE("CLI: --help on every subcommand exits 0", "[control]") {
  for (const auto& args :
       {std::vector<std::string>{"--help"}, {"-h"}, {"run", "--help"},
        {"check-config", "--help"}, {"status", "--help"}}) {
    INFO("blockrelay " << args[0] << (args.size() > 1 ? " " + args[1] : ""));
    ProcessResult r = RunBlockrelay(args);
    INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
    REQUIRE(r.exited);
    CHECK(r.exit_code == 0);
    CHECK_FALSE(r.out.empty());
  }
  ProcessResult status = RunBlockrelay({"status", "--help"});
  CHECK_THAT(status.out, Contains("--json"));
  CHECK_THAT(status.out, Contains("--socket"));
}

// --- FormatBytes / FormatTable / FormatStatus ------------------------------------

TEST_CASE("FormatBytes: bytes below 1 KiB are whole bytes", "[control]") {
  CHECK(FormatBytes(0) == "0 B");
  CHECK(FormatBytes(1) == "1 B");
  CHECK(FormatBytes(512) == "512 B");
  CHECK(FormatBytes(1023) == "1023 B");
}

TEST_CASE("FormatBytes: larger sizes use binary units with one decimal",
          "[control]") {
  CHECK(FormatBytes(1024) == "1.0 KiB");
  CHECK(FormatBytes(1536) == "1.5 KiB");
  CHECK(FormatBytes(16ull << 20) == "16.0 MiB");
  CHECK(FormatBytes(3ull << 29) == "1.5 GiB");
  CHECK(FormatBytes(1ull << 40) == "1.0 TiB");
  CHECK(FormatBytes(5ull << 50) == "5.0 PiB");
  CHECK(FormatBytes(~0ull) == "16384.0 PiB");
}

TEST_CASE("FormatBytes: a value that rounds up to 1024 moves to the next unit",
          "[control]") {
  CHECK(FormatBytes((1ull << 20) - 1) == "1.0 MiB");
  CHECK(FormatBytes((1ull << 30) - 1) == "1.0 GiB");
  CHECK(FormatBytes(1023 * 1024 + 1000) == "1.0 MiB");
  CHECK(FormatBytes(1023 * 1024) == "1023.0 KiB");
}

TEST_CASE("FormatTable: columns are padded to the widest cell, two spaces "
          "apart",
          "[control]") {
  std::string t = FormatTable({{"A", "BB", "C"}, {"long", "x", "yy"}});
  CHECK(t == "A     BB  C\n"
             "long  x   yy\n");
}

TEST_CASE("FormatTable: rows may have fewer cells, and nothing trails the "
          "last one",
          "[control]") {
  std::string t = FormatTable({{"NAME", "SIZE"}, {"a"}, {}});
  CHECK(t == "NAME  SIZE\n"
             "a\n"
             "\n");
  CHECK(FormatTable({}).empty());
}

json SampleStatus() {
  return json::parse(R"({
    "ok": true, "site": "a", "version": "0.1.0", "pid": 42,
    "uptime_seconds": 3725, "nbd_connections": 2,
    "groups": [{
      "name": "db", "role": "primary", "region_size_bytes": 65536,
      "volumes": [
        {"name": "wal", "size_bytes": 67108864, "role": "primary",
         "read_only": false, "backing": "/srv/wal.img", "nbd_clients": 2,
         "bytes_read": 1536, "bytes_written": 1048576},
        {"name": "data", "size_bytes": 268435456, "role": "primary",
         "read_only": true, "backing": "/srv/data.img", "nbd_clients": 0,
         "bytes_read": 0, "bytes_written": 0}
      ],
      "downstream": []
    }]
  })");
}

TEST_CASE("FormatStatus: header line has site, version, pid, uptime and "
          "connections",
          "[control]") {
  std::string out = FormatStatus(SampleStatus());
  std::string first = out.substr(0, out.find('\n'));
  CHECK(first ==
        "site a  version 0.1.0  pid 42  up 1h02m05s  nbd connections 2");
}

TEST_CASE("FormatStatus: one table row per volume", "[control]") {
  std::string out = FormatStatus(SampleStatus());
  CHECK_THAT(out, Contains("GROUP"));
  CHECK_THAT(out, Contains("BACKING"));
  // Rows are aligned: find each volume's line.
  auto line_of = [&](const std::string& needle) {
    auto pos = out.find(needle);
    REQUIRE(pos != std::string::npos);
    auto start = out.rfind('\n', pos) + 1;
    return out.substr(start, out.find('\n', pos) - start);
  };
  std::string wal = line_of("/srv/wal.img");
  CHECK_THAT(wal, Contains("wal"));
  CHECK_THAT(wal, Contains("64.0 MiB"));
  CHECK_THAT(wal, Contains("1.5 KiB"));
  CHECK_THAT(wal, Contains("1.0 MiB"));
  CHECK_THAT(wal, Contains("read-write"));
  std::string data = line_of("/srv/data.img");
  CHECK_THAT(data, Contains("256.0 MiB"));
  CHECK_THAT(data, Contains("read-only"));
  // No link table without links.
  CHECK_THAT(out, !Contains("DIRTY"));
}

TEST_CASE("FormatStatus: a failed volume shows its error", "[control]") {
  json s = SampleStatus();
  s["groups"][0]["volumes"][0]["error"] = "flush failed";
  CHECK_THAT(FormatStatus(s), Contains("FAILED: flush failed"));
}

TEST_CASE("FormatStatus: links get their own table", "[control]") {
  json s = SampleStatus();
  s["groups"][0]["volumes"][0]["links"] = json::array(
      {{{"site", "b"}, {"mode", "sync"}, {"state", "connected"},
        {"dirty_regions", 3}, {"dirty_bytes", 196608}}});
  std::string out = FormatStatus(s);
  CHECK_THAT(out, Contains("DIRTY BYTES"));
  CHECK_THAT(out, Contains("connected"));
  CHECK_THAT(out, Contains("192.0 KiB"));
}

TEST_CASE("FormatStatus: a secondary shows whether it is consistent and "
          "its undo record",
          "[control]") {
  json s = SampleStatus();
  s["groups"][0]["role"] = "secondary";
  s["groups"][0]["volumes"][0]["consistent"] = false;
  s["groups"][0]["volumes"][1]["consistent"] = false;
  s["groups"][0]["upstream"] = {{"site", "a"}, {"state", "waiting"},
                                {"consistent", false}, {"undo_bytes", 3145728}};
  std::string out = FormatStatus(s);
  CHECK_THAT(out, Contains("read-write, INCONSISTENT"));
  CHECK_THAT(out, Contains("CONSISTENT  UNDO"));
  CHECK_THAT(out, Contains("3.0 MiB"));
  s["groups"][0]["volumes"][0]["consistent"] = true;
  s["groups"][0]["upstream"]["consistent"] = true;
  s["groups"][0]["upstream"]["undo_bytes"] = 0;
  s["groups"][0]["upstream"]["full_resync_requested"] = true;
  out = FormatStatus(s);
  CHECK_THAT(out, Contains("read-write, consistent"));
  CHECK_THAT(out, Contains("full resync requested"));
}

TEST_CASE("FormatStatus: missing fields print as dashes and zeroes",
          "[control]") {
  std::string out = FormatStatus(json::object());
  CHECK(out == "site -  version -  pid -  up 0h00m00s  nbd connections 0\n");
}

TEST_CASE("FormatStatus: entries of the wrong type are skipped, not thrown on",
          "[control]") {
  // Goal: a reply from a newer or broken daemon must not crash the CLI.
  json s = SampleStatus();
  s["groups"].push_back(42);
  s["groups"].push_back({{"name", "odd"}, {"volumes", {1, "two", nullptr}}});
  s["groups"][0]["volumes"][0]["read_only"] = "yes";
  s["groups"][0]["volumes"][1]["links"] = json::array({7});
  std::string out;
  REQUIRE_NOTHROW(out = FormatStatus(s));
  CHECK_THAT(out, Contains("/srv/wal.img"));
  REQUIRE_NOTHROW(FormatStatus(json::array({1, 2})));
  REQUIRE_NOTHROW(FormatStatus(json{{"groups", "none"}}));
  REQUIRE_NOTHROW(FormatStatus(json{{"uptime_seconds", -5}}));
}

}  // namespace
}  // namespace blockrelay::control
