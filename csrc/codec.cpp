#include "codec.h"

#include <cstring>
#include <new>

namespace dckpt {
namespace {

// Plain element-by-element loops, for widths without a specialisation.
void shuffle_any(const uint8_t* src, uint8_t* dst, size_t n, size_t w) {
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < w; ++j) dst[j * n + i] = src[i * w + j];
}

void unshuffle_any(const uint8_t* src, uint8_t* dst, size_t n, size_t w) {
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < w; ++j) dst[i * w + j] = src[j * n + i];
}

// Chunk sizes are powers of two, so the W planes lie a power of two apart and
// element-by-element stores to all of them fight over the same cache sets (16-byte
// elements ran at 0.5 GB/s). Transposing kTile elements at a time through a small tile
// turns that into W contiguous runs of kTile bytes: 10-35 GB/s for every W.
constexpr size_t kTile = 64;

template <size_t W>
void shuffle_fixed(const uint8_t* src, uint8_t* dst, size_t n) {
  size_t i0 = 0;
  for (; i0 + kTile <= n; i0 += kTile) {
    uint8_t tile[W][kTile];
    for (size_t i = 0; i < kTile; ++i)
      for (size_t j = 0; j < W; ++j) tile[j][i] = src[(i0 + i) * W + j];
    for (size_t j = 0; j < W; ++j) std::memcpy(dst + j * n + i0, tile[j], kTile);
  }
  for (size_t i = i0; i < n; ++i)
    for (size_t j = 0; j < W; ++j) dst[j * n + i] = src[i * W + j];
}

template <size_t W>
void unshuffle_fixed(const uint8_t* src, uint8_t* dst, size_t n) {
  size_t i0 = 0;
  for (; i0 + kTile <= n; i0 += kTile) {
    uint8_t tile[W][kTile];
    for (size_t j = 0; j < W; ++j) std::memcpy(tile[j], src + j * n + i0, kTile);
    for (size_t i = 0; i < kTile; ++i)
      for (size_t j = 0; j < W; ++j) dst[(i0 + i) * W + j] = tile[j][i];
  }
  for (size_t i = i0; i < n; ++i)
    for (size_t j = 0; j < W; ++j) dst[i * W + j] = src[j * n + i];
}

}  // namespace

void shuffle(const uint8_t* src, uint8_t* dst, size_t len, size_t width) {
  size_t n = width > 1 ? len / width : 0;
  switch (width) {
    case 2: shuffle_fixed<2>(src, dst, n); break;
    case 4: shuffle_fixed<4>(src, dst, n); break;
    case 8: shuffle_fixed<8>(src, dst, n); break;
    case 16: shuffle_fixed<16>(src, dst, n); break;
    default: if (n > 0) shuffle_any(src, dst, n, width);
  }
  if (len > n * width) std::memcpy(dst + n * width, src + n * width, len - n * width);
}

void unshuffle(const uint8_t* src, uint8_t* dst, size_t len, size_t width) {
  size_t n = width > 1 ? len / width : 0;
  switch (width) {
    case 2: unshuffle_fixed<2>(src, dst, n); break;
    case 4: unshuffle_fixed<4>(src, dst, n); break;
    case 8: unshuffle_fixed<8>(src, dst, n); break;
    case 16: unshuffle_fixed<16>(src, dst, n); break;
    default: if (n > 0) unshuffle_any(src, dst, n, width);
  }
  if (len > n * width) std::memcpy(dst + n * width, src + n * width, len - n * width);
}

uint8_t* Scratch::get(size_t len) {
  if (len > capacity_ || !data_) {
    data_.reset();  // free the old block before asking for a larger one
    capacity_ = 0;
    // Never null, even for 0 bytes, so callers may hand it to memcpy and friends.
    data_.reset(new uint8_t[len > 0 ? len : 1]);
    capacity_ = len;
  }
  return data_.get();
}

bool valid_zstd_level(int level) {
  return level >= ZSTD_minCLevel() && level <= ZSTD_maxCLevel();
}

Zstd::~Zstd() {
  ZSTD_freeCCtx(cctx_);
  ZSTD_freeDCtx(dctx_);
}

std::string Zstd::compress(const void* src, size_t len, void* dst, int level, size_t* frame_len) {
  if (cctx_ == nullptr && (cctx_ = ZSTD_createCCtx()) == nullptr) throw std::bad_alloc();
  size_t r = ZSTD_compressCCtx(cctx_, dst, ZSTD_compressBound(len), src, len, level);
  if (ZSTD_isError(r)) return std::string("zstd compression failed: ") + ZSTD_getErrorName(r);
  *frame_len = r;
  return "";
}

std::string Zstd::decompress(const void* src, size_t len, void* dst, size_t raw_len) {
  size_t frame = ZSTD_findFrameCompressedSize(src, len);
  if (ZSTD_isError(frame)) return std::string("not a zstd frame: ") + ZSTD_getErrorName(frame);
  if (frame != len) return "bytes after the end of the zstd frame";
  unsigned long long content = ZSTD_getFrameContentSize(src, len);
  if (content == ZSTD_CONTENTSIZE_ERROR) return "unreadable zstd frame header";
  if (content != ZSTD_CONTENTSIZE_UNKNOWN && content != raw_len)
    return "zstd frame holds " + std::to_string(content) + " bytes, the record says " +
           std::to_string(raw_len);
  if (dctx_ == nullptr && (dctx_ = ZSTD_createDCtx()) == nullptr) throw std::bad_alloc();
  size_t r = ZSTD_decompressDCtx(dctx_, dst, raw_len, src, len);
  if (ZSTD_isError(r)) return std::string("corrupt zstd frame: ") + ZSTD_getErrorName(r);
  if (r != raw_len)
    return "zstd frame decoded to " + std::to_string(r) + " bytes, the record says " +
           std::to_string(raw_len);
  return "";
}

}  // namespace dckpt
