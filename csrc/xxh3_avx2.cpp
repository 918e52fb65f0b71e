// XXH3 with AVX2 vectors, used only when the CPU reports AVX2 (see xxh3_isa.h).
// Include nothing else here: every inline function in this file is compiled for AVX2.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2")
#define XXH_VECTOR 2  // XXH_AVX2
#include <immintrin.h>  // xxhash.h includes it only when the whole build targets AVX2

#include "xxh3_isa.h"

namespace dckpt {
namespace {
uint64_t hash(const void* data, size_t len) { return XXH3_64bits(data, len); }
void update(XXH3_state_t* s, const void* data, size_t len) { XXH3_64bits_update(s, data, len); }
uint64_t digest(const XXH3_state_t* s) { return XXH3_64bits_digest(s); }
}  // namespace
const Xxh3 kXxh3Avx2 = {"avx2", hash, update, digest};
}  // namespace dckpt
#endif
