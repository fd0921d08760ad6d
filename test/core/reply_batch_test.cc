// ReplyBatch: sends deferred while a batch is open run when the outermost
// batch on that thread closes, and only then.
#include "blockrelay/core/reply_batch.h"

#include <thread>
#include <vector>

#include <catch2/catch.hpp>

namespace blockrelay::core {
namespace {

TEST_CASE("ReplyBatch: no batch is open unless one is in scope", "[reply-batch]") {
  CHECK_FALSE(ReplyBatch::Active());
  {
    ReplyBatch batch;
    CHECK(ReplyBatch::Active());
  }
  CHECK_FALSE(ReplyBatch::Active());
}

TEST_CASE("ReplyBatch: a deferred send runs when the batch closes, in order",
          "[reply-batch]") {
  std::vector<int> sent;
  {
    ReplyBatch batch;
    ReplyBatch::Defer([&] { sent.push_back(1); });
    ReplyBatch::Defer([&] { sent.push_back(2); });
    CHECK(sent.empty());
  }
  CHECK(sent == std::vector<int>{1, 2});
}

TEST_CASE("ReplyBatch: an inner batch leaves its sends to the outermost one",
          "[reply-batch]") {
  std::vector<int> sent;
  {
    ReplyBatch outer;
    {
      ReplyBatch inner;
      ReplyBatch::Defer([&] { sent.push_back(1); });
    }
    CHECK(sent.empty());
    CHECK(ReplyBatch::Active());
  }
  CHECK(sent == std::vector<int>{1});
}

TEST_CASE("ReplyBatch: a deferred send may open and use a batch of its own",
          "[reply-batch]") {
  std::vector<int> sent;
  {
    ReplyBatch batch;
    ReplyBatch::Defer([&] {
      ReplyBatch nested;
      ReplyBatch::Defer([&] { sent.push_back(2); });
      sent.push_back(1);
    });
  }
  CHECK(sent == std::vector<int>{1, 2});
  CHECK_FALSE(ReplyBatch::Active());
}

TEST_CASE("ReplyBatch: a batch covers only its own thread", "[reply-batch]") {
  ReplyBatch batch;
  bool active_elsewhere = true;
  std::thread other([&] { active_elsewhere = ReplyBatch::Active(); });
  other.join();
  CHECK_FALSE(active_elsewhere);
  CHECK(ReplyBatch::Active());
}

}  // namespace
}  // namespace blockrelay::core
