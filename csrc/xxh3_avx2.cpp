// XXH3 with AVX2 vectors, used only when the CPU reports AVX2 (see xxh3_isa.h).
// Include nothing else here: every inline function in this file is compiled for AVX2.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2")
#define XXH_VECTOR 2  // XXH_AVX2
#include <immintrin.h>  // xxhash.h includes it only when the whole build targets AVX2

#define XXH3_TABLE kXxh3Avx2
#define XXH3_ISA "avx2"
#include "xxh3_variant.inc"
#endif
