// XXH3 with AVX-512 vectors, used only when the CPU reports AVX-512F (see xxh3_isa.h).
// Include nothing else here: every inline function in this file is compiled for AVX-512.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f")
// GCC 12's own AVX-512 intrinsics trip these warnings (known false positives).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define XXH_VECTOR 3  // XXH_AVX512
#include <immintrin.h>  // xxhash.h includes it only when the whole build targets AVX2

#define XXH3_TABLE kXxh3Avx512
#define XXH3_ISA "avx512"
#include "xxh3_variant.inc"
#endif
