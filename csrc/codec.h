// Chunk codecs: XXH3 hashing, byte shuffle, zstd frames with reusable contexts.
#pragma once

#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "xxh3_isa.h"

namespace dckpt {

// On-disk codec ids (part of the format).
enum Codec : int64_t { kRaw = 0, kZstd = 1, kZstdShuffle = 2 };

inline uint64_t hash64(const void* data, size_t len) { return xxh3().hash(data, len); }

// Incremental XXH3-64 (seed 0); equals hash64 of the concatenated input.
class StreamHash {
 public:
  StreamHash() : impl_(xxh3()) { XXH3_64bits_reset(&state_); }
  void update(const void* data, size_t len) { impl_.update(&state_, data, len); }
  uint64_t digest() const { return impl_.digest(&state_); }

 private:
  const Xxh3& impl_;
  XXH3_state_t state_;
};

// Byte shuffle by element width w: with n = len / w, dst[j*n + i] = src[i*w + j];
// the len % w trailing bytes are copied unchanged to the end.
void shuffle(const uint8_t* src, uint8_t* dst, size_t len, size_t width);
void unshuffle(const uint8_t* src, uint8_t* dst, size_t len, size_t width);

// Grows on demand, never shrinks within a call; contents uninitialized.
class Scratch {
 public:
  uint8_t* get(size_t len);

 private:
  std::unique_ptr<uint8_t[]> data_;
  size_t capacity_ = 0;
};

bool valid_zstd_level(int level);

// One worker's zstd contexts, created on first use and reused for every chunk.
class Zstd {
 public:
  Zstd() = default;
  ~Zstd();
  Zstd(const Zstd&) = delete;
  Zstd& operator=(const Zstd&) = delete;

  // Compresses src into one frame in dst, which must hold ZSTD_compressBound(len) bytes.
  // Returns "" and sets *frame_len, or returns the error.
  std::string compress(const void* src, size_t len, void* dst, int level, size_t* frame_len);

  // Decodes src, which must be exactly one frame of exactly raw_len bytes, into dst.
  // Returns "" or why the frame is unusable.
  std::string decompress(const void* src, size_t len, void* dst, size_t raw_len);

 private:
  ZSTD_CCtx* cctx_ = nullptr;
  ZSTD_DCtx* dctx_ = nullptr;
};

}  // namespace dckpt
