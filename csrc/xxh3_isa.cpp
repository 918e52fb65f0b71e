#include "xxh3_isa.h"

#include <cstdlib>
#include <cstring>

namespace dckpt {
namespace {

const Xxh3& pick() {
#if defined(__x86_64__) || defined(__i386__)
  const char* cap = std::getenv("DCKPT_XXH3");  // tests force each variant
  bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
  __builtin_cpu_init();
  if (allow512 && __builtin_cpu_supports("avx512f")) return kXxh3Avx512;
  if (allow2 && __builtin_cpu_supports("avx2")) return kXxh3Avx2;
#endif
  return kXxh3Sse2;
}

}  // namespace

const Xxh3& xxh3() {
  static const Xxh3& chosen = pick();
  return chosen;
}

}  // namespace dckpt
