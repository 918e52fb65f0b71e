// XXH3 (seed 0) compiled for one x86 instruction set per translation unit, so the core
// hashes with the widest vectors the CPU has: AVX-512 hashes cached data about 3x faster
// than the SSE2 baseline, and every byte saved or loaded is hashed. All give the same hash.
#pragma once

#include <xxhash.h>

#include <cstddef>
#include <cstdint>

namespace dckpt {

struct Xxh3 {
  const char* isa;
  uint64_t (*hash)(const void* data, size_t len);
  void (*update)(XXH3_state_t* state, const void* data, size_t len);
  uint64_t (*digest)(const XXH3_state_t* state);
};

extern const Xxh3 kXxh3Sse2;
#if defined(__x86_64__) || defined(__i386__)
extern const Xxh3 kXxh3Avx2;
extern const Xxh3 kXxh3Avx512;
#endif

// The widest variant this CPU runs, at most DCKPT_XXH3=sse2|avx2|avx512 when set.
const Xxh3& xxh3();

}  // namespace dckpt
