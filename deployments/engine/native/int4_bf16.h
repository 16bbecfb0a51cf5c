// The int4 x bf16 matmul on AVX512-BF16 (`vdpbf16ps`): two multiply-adds per fp32 lane and
// instruction, and no per-weight dequantization.
//
// ATen's CPU int4 kernel dequantizes every weight to fp32, w = (q - 8) * scale + zero, and
// multiplies in fp32: at one row it is bound by the instructions that dequantize, at 16 rows
// by fp32 FMAs. Here one table lookup (vpermw) turns a nibble into the bf16 operand q - 8
// (exact), the products x * (q - 8) are exact in fp32, and a group's scale and zero apply
// once to the group's sums:  sum_k x_k w_k = scale * sum_k x_k (q_k - 8) + zero * sum_k x_k.
// The inputs are the bf16 activations ATen's kernel takes, the output is rounded to bf16 as
// ATen's is; only the fp32 summation differs (measured against ATen and float64 in the tests).

// Batch invariance: a row's outputs come from the same instructions in the same order whatever
// the number of rows; tiles of rows and of output blocks only interleave independent sums.
//
// Packed layout, per block of 16 outputs and per group: group_size / 8 chunks of 64 bytes, a
// chunk one dword per output holding the nibbles of 8 consecutive inputs (input i at bits
// 4i..4i+3). (dword >> 4s) & 0x000F000F puts inputs s and s + 4 in the low and high bf16 of
// a lane, so the activations are laid out in the same pairs: x0 x4 x1 x5 x2 x6 x3 x7.

#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace int4_bf16 {

using at::Tensor;

constexpr int kBlock = 16;       // outputs a block: one fp32 zmm

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kAvailable = true;

// RT rows by NB output blocks: RT * NB independent fp32 sums, so that a single row still keeps
// several dot-product chains in flight. The tile's activations are interleaved by row (pair j
// of row r at xp[j * RT + r], group sums likewise), so one pointer and constant offsets reach
// every row: 16 row pointers would not fit in the general registers.
template <int RT, int NB, typename Out>
inline void tile(const uint8_t* w, int64_t block_bytes, const float* scale, const float* zero,
                 int64_t groups, int chunks, const uint32_t* xp, const float* xs, Out* out,
                 int64_t out_stride, int64_t n0, int64_t n) {
  // bf16(q - 8) for q = 0..15, twice: vpermw reads 5 index bits, the fifth belongs to the
  // next nibble and must not matter.
  const __m512i signed_q = _mm512_set_epi16(
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, 0xBF80, 0xC000, 0xC040,
      0xC080, 0xC0A0, 0xC0C0, 0xC0E0, 0xC100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000,
      0x3F80, 0x0000, 0xBF80, 0xC000, 0xC040, 0xC080, 0xC0A0, 0xC0C0, 0xC0E0, 0xC100);
  // The running sums live in memory (L1): with RT * NB group sums in registers there is no
  // room for them, and they are touched once a group.
  alignas(64) float res[RT][NB][kBlock] = {};
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[RT][NB];
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      const int64_t chunk = g * chunks + c;
      const uint32_t* xc = xp + chunk * 4 * RT;
      for (int b = 0; b < NB; ++b) {
        const __m512i d = _mm512_loadu_si512(w + b * block_bytes + chunk * 64);
        for (int s = 0; s < 4; ++s) {
          const __m512i q = _mm512_permutexvar_epi16(_mm512_srli_epi32(d, 4 * s), signed_q);
          for (int r = 0; r < RT; ++r) {
            const __m512i x = _mm512_set1_epi32(static_cast<int>(xc[s * RT + r]));
            acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)q, (__m512bh)x);
          }
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 sc = _mm512_loadu_ps(scale + (b * groups + g) * kBlock);
      const __m512 zc = _mm512_loadu_ps(zero + (b * groups + g) * kBlock);
      for (int r = 0; r < RT; ++r) {
        const __m512 sum_x = _mm512_set1_ps(xs[g * RT + r]);
        const __m512 part = _mm512_fmadd_ps(sc, acc[r][b], _mm512_mul_ps(zc, sum_x));
        _mm512_store_ps(res[r][b], _mm512_add_ps(_mm512_load_ps(res[r][b]), part));
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t first = n0 + b * kBlock;
    const int64_t valid = std::min<int64_t>(kBlock, n - first);
    const __mmask16 mask = valid >= kBlock ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    for (int r = 0; r < RT; ++r) {
      const __m512 sums = _mm512_load_ps(res[r][b]);
      const __m256i bits = (__m256i)_mm512_cvtneps_pbh(sums);  // round to nearest even
      if constexpr (std::is_same_v<Out, float>) {  // the bf16 value, widened (exact)
        const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
        _mm512_mask_storeu_ps(out + r * out_stride + first, mask, _mm512_castsi512_ps(wide));
      } else {
        _mm256_mask_storeu_epi16(out + r * out_stride + first, mask, bits);
      }
    }
  }
}

// A tile's rows against output blocks [b0, b1), NB blocks at a time.
template <int RT, int NB, typename Out>
inline void tile_against_blocks(const uint8_t* w, int64_t block_bytes, const float* scale,
                                const float* zero, int64_t groups, int chunks,
                                const uint32_t* xp, const float* xs, Out* out, int64_t n,
                                int64_t b0, int64_t b1) {
  const int64_t per_block = groups * kBlock;  // scales (or zeros) a block
  int64_t b = b0;
  for (; b + NB <= b1; b += NB)
    tile<RT, NB>(w + b * block_bytes, block_bytes, scale + b * per_block, zero + b * per_block,
                 groups, chunks, xp, xs, out, n, b * kBlock, n);
  for (; b < b1; ++b)
    tile<RT, 1>(w + b * block_bytes, block_bytes, scale + b * per_block, zero + b * per_block,
                groups, chunks, xp, xs, out, n, b * kBlock, n);
}

// Row r of a tile of `rt` rows starting at xp / xs: the bf16 activations (rounded to nearest
// even, as .to(bf16) does, where x is fp32) in the weights' pair order, and each group's sum.
template <typename In>
inline void prepare_row(const In* src, int64_t k, int64_t group_size, int64_t rt, int64_t r,
                        uint32_t* xp, float* xs) {
  auto bits = [&](int64_t i) -> uint32_t {
    if constexpr (std::is_same_v<In, float>) return c10::BFloat16(src[i]).x;
    else return src[i];
  };
  for (int64_t j = 0; j < k; j += 8)
    for (int s = 0; s < 4; ++s) xp[(j / 2 + s) * rt + r] = bits(j + s) | (bits(j + s + 4) << 16);
  for (int64_t g = 0; g * group_size < k; ++g) {
    float sum = 0.f;
    for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i)
      sum += c10::BFloat16(static_cast<uint16_t>(bits(i)), c10::BFloat16::from_bits());
    xs[g * rt + r] = sum;
  }
}
#else
constexpr bool kAvailable = false;
#endif

// Pack (N, K) nibbles (uint8, 0..15) and per-group scales and zeros ((K / group, N, 2), as
// ATen's scales_and_zeros) into the layout above: (packed weights, scales, zeros).
inline std::vector<Tensor> pack(const Tensor& q, const Tensor& scales_and_zeros,
                                int64_t group_size) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "nibbles: (N, K) uint8");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(group_size % 8 == 0 && k % group_size == 0, "K must be a multiple of the group");
  const int64_t groups = k / group_size, blocks = (n + kBlock - 1) / kBlock;
  const int64_t padded = blocks * kBlock;
  // Padding outputs have q = 8 and scale = zero = 0: they compute zeros and are never stored.
  Tensor qp = at::full({padded, k}, 8, q.options());
  qp.narrow(0, 0, n).copy_(q);
  // (blocks, 16, K / 8, 8) -> (blocks, K / 8, 16, 8): a chunk is 16 outputs x 8 inputs.
  Tensor nib = qp.view({blocks, kBlock, k / 8, 8}).permute({0, 2, 1, 3}).to(at::kLong);
  Tensor shifts = at::arange(0, 32, 4, nib.options());
  Tensor dwords = nib.bitwise_left_shift(shifts).sum(-1).to(at::kUInt32).contiguous();
  Tensor sz = scales_and_zeros.to(at::kFloat);  // (groups, N, 2)
  Tensor s = at::zeros({padded, groups}, sz.options()), z = at::zeros({padded, groups}, sz.options());
  s.narrow(0, 0, n).copy_(sz.select(2, 0).t());
  z.narrow(0, 0, n).copy_(sz.select(2, 1).t());
  // (blocks, groups, 16): a group's scales for the block's outputs, side by side.
  auto per_block = [&](const Tensor& t) {
    return t.view({blocks, kBlock, groups}).permute({0, 2, 1}).contiguous();
  };
  return {dwords.view(at::kByte), per_block(s), per_block(z)};
}

// x (rows, K) bf16 or fp32 -> (rows, N) in x's dtype; an fp32 result holds the bf16-rounded
// value, exactly what a bf16 result converted to fp32 would (so callers in fp32 skip two casts).
inline Tensor matmul(const Tensor& x_in, const Tensor& packed, const Tensor& scale,
                     const Tensor& zero, int64_t n, int64_t group_size) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const bool fp32 = x_in.scalar_type() == at::kFloat;
  const Tensor x = fp32 ? x_in.contiguous() : x_in.to(at::kBFloat16).contiguous();
  TORCH_CHECK(x.dim() == 2, "x: (rows, K)");
  const int64_t rows = x.size(0), k = x.size(1);
  const int64_t groups = k / group_size, blocks = (n + kBlock - 1) / kBlock;
  const int chunks = static_cast<int>(group_size / 8);
  TORCH_CHECK(group_size % 8 == 0 && k % group_size == 0 &&
                  packed.numel() == blocks * kBlock * k / 2 && packed.is_contiguous(),
              "packed weights do not match x");
  for (const Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->numel() == blocks * groups * kBlock,
                "scales and zeros do not match the packed weights");
  Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  // Row tiles of 16, then 8, 4, 2, 1 rows; fewer rows take more output blocks at a time.
  std::vector<int64_t> tile_first, tile_rows;
  for (int64_t r0 = 0; r0 < rows;)
    for (int64_t t : {16, 8, 4, 2, 1})
      if (rows - r0 >= t) {
        tile_first.push_back(r0);
        tile_rows.push_back(t);
        r0 += t;
        break;
      }
  const int64_t tiles = static_cast<int64_t>(tile_rows.size());
  // Activations interleaved by row within a tile (see `tile`), and their group sums.
  std::vector<uint32_t> xp(rows * k / 2);
  std::vector<float> xs(rows * groups);
  const int64_t prep_grain = rows * k < (1 << 16) ? tiles : 1;  // small calls: no thread wake-up
  at::parallel_for(0, tiles, prep_grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = tile_first[t], rt = tile_rows[t];
      for (int64_t r = 0; r < rt; ++r) {
        uint32_t* p = xp.data() + r0 * k / 2;
        float* s = xs.data() + r0 * groups;
        if (fp32)
          prepare_row(x.data_ptr<float>() + (r0 + r) * k, k, group_size, rt, r, p, s);
        else
          prepare_row(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) +
                          (r0 + r) * k, k, group_size, rt, r, p, s);
      }
    }
  });
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* sc = scale.data_ptr<float>();
  const float* zc = zero.data_ptr<float>();
  const int64_t block_bytes = kBlock * k / 2;
  constexpr int64_t kUnit = 4;  // blocks a task: one 1-row tile's worth
  const int64_t units = (blocks + kUnit - 1) / kUnit;
  auto run = [&](auto* o) {
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      const int64_t b0 = begin * kUnit, b1 = std::min(blocks, end * kUnit);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = tile_first[t];
        const uint32_t* xt = xp.data() + r0 * k / 2;
        const float* st = xs.data() + r0 * groups;
        auto* ot = o + r0 * n;
        switch (tile_rows[t]) {
          case 16:
            tile_against_blocks<16, 1>(w, block_bytes, sc, zc, groups, chunks, xt, st, ot, n,
                                       b0, b1);
            break;
          case 8:
            tile_against_blocks<8, 2>(w, block_bytes, sc, zc, groups, chunks, xt, st, ot, n, b0,
                                      b1);
            break;
          case 4:
            tile_against_blocks<4, 2>(w, block_bytes, sc, zc, groups, chunks, xt, st, ot, n, b0,
                                      b1);
            break;
          case 2:
            tile_against_blocks<2, 4>(w, block_bytes, sc, zc, groups, chunks, xt, st, ot, n, b0,
                                      b1);
            break;
          default:
            tile_against_blocks<1, 4>(w, block_bytes, sc, zc, groups, chunks, xt, st, ot, n, b0,
                                      b1);
        }
      }
    });
  };
  if (fp32)
    run(out.data_ptr<float>());
  else
    run(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
#else
  TORCH_CHECK(false, "the bf16 int4 kernel needs AVX512-BF16");
  return x_in;
#endif
}

}  // namespace int4_bf16
