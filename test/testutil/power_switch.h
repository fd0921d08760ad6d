// PowerSwitch: one simulated power supply for every faulty device of a test.
//
// FaultInjectionEnv (metadata files) and FaultInjectionBlockStore (the
// volume) both consult the same PowerSwitch before each mutating operation,
// so "the power fails after the 17th operation" hits the metadata and the
// data at the same instant, wherever that instant falls inside a Scoreboard
// commit. Once off, mutating operations still return OK (the process does not
// know it is dead yet) but change nothing.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>

namespace blockrelay::testutil {

class PowerSwitch {
 public:
  // The power goes off just before the (ops+1)-th mutating operation from
  // now: `ops` more operations take effect. Negative: never.
  void CutAfter(int64_t ops) {
    budget_.store(ops < 0 ? kUnlimited : ops);
    on_.store(true);
  }
  void Cut() { on_.store(false); }
  // Power back on with no pending cut (after the "reboot").
  void Restore() {
    budget_.store(kUnlimited);
    on_.store(true);
  }
  bool on() const { return on_.load(); }
  // Called by a device before a mutating operation: true if it may happen.
  bool Tick() {
    if (!on_.load()) return false;
    int64_t left = budget_.load();
    while (left != kUnlimited) {
      if (left == 0) {
        on_.store(false);
        return false;
      }
      if (budget_.compare_exchange_weak(left, left - 1)) return true;
    }
    return true;
  }

 private:
  static constexpr int64_t kUnlimited = -1;
  std::atomic<bool> on_{true};
  std::atomic<int64_t> budget_{kUnlimited};
};

}  // namespace blockrelay::testutil
