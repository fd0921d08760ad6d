// VolumeFixture: a volume's metadata on a FaultInjectionEnv over a MemEnv,
// for scoreboard and metadata tests.
//
// Thread safety: one fixture per test; the VolumeMetadata it opens follows
// its own rules.
#pragma once

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "blockrelay/io/mem_env.h"
#include "blockrelay/storage/volume_metadata.h"
#include "testutil/fault_injection_env.h"
#include "testutil/power_switch.h"

namespace blockrelay::testutil {

class VolumeFixture {
 public:
  static constexpr const char* kDataDir = "/data";
  static constexpr const char* kBacking = "/backing.img";

  VolumeFixture() {
    REQUIRE(mem.CreateDirs(kDataDir).ok());
    REQUIRE(mem.OpenFile(kBacking, io::OpenMode::kCreate).ok());
  }

  // Downstream links "b" (clean: initial_sync none) unless given.
  storage::VolumeMetadataOptions Options(
      uint64_t size_bytes = 64ull << 20, uint64_t region_size_bytes = 64 << 10,
      std::vector<storage::DownstreamSlotOptions> links = {{"b", true}}) {
    storage::VolumeMetadataOptions o;
    o.env = &env;
    o.data_dir = kDataDir;
    o.group = "g";
    o.volume = "v";
    o.size_bytes = size_bytes;
    o.region_size_bytes = region_size_bytes;
    o.backing_path = kBacking;
    o.downstream = std::move(links);
    return o;
  }

  std::unique_ptr<storage::VolumeMetadata> OpenOk(const storage::VolumeMetadataOptions& o) {
    Result<std::unique_ptr<storage::VolumeMetadata>> meta = storage::VolumeMetadata::Open(o);
    INFO(meta.status().ToString());
    REQUIRE(meta.ok());
    return std::move(*meta);
  }

  std::string MetaPath() const { return storage::MetadataPath(kDataDir, "g", "v"); }

  // Direct access to the bytes on the (simulated) disk.
  void WriteRaw(uint64_t offset, std::span<const std::byte> bytes) {
    auto f = mem.OpenFile(MetaPath(), io::OpenMode::kReadWrite);
    REQUIRE(f.ok());
    REQUIRE((*f)->PWrite(offset, bytes).ok());
  }
  std::vector<std::byte> ReadRaw(uint64_t offset, size_t n) {
    auto f = mem.OpenFile(MetaPath(), io::OpenMode::kReadOnly);
    REQUIRE(f.ok());
    std::vector<std::byte> buf(n);
    REQUIRE(io::ReadFully(**f, offset, buf).ok());
    return buf;
  }
  void FlipByte(uint64_t offset) {
    std::vector<std::byte> b = ReadRaw(offset, 1);
    b[0] ^= std::byte{0xff};
    WriteRaw(offset, b);
  }

  io::MemEnv mem;
  PowerSwitch power;
  FaultInjectionEnv env{&mem, &power};
};

}  // namespace blockrelay::testutil
