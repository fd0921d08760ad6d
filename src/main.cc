#include <fmt/core.h>
int main() { fmt::print("blockrelay {}\n", BLOCKRELAY_VERSION); }
