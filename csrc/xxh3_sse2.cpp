// XXH3 as the build targets it: SSE2 on x86-64 (every such CPU has it).
#define XXH3_TABLE kXxh3Sse2
#if defined(__x86_64__) || defined(__i386__)
#define XXH3_ISA "sse2"
#else
#define XXH3_ISA "default"
#endif
#include "xxh3_variant.inc"
