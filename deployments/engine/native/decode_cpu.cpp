// One decode step of a Llama-family decoder on CPU, as a single call from Python.
//
// The eager step issues ~50 ATen ops a layer (norms, rope, cache writes, the attention's
// matmuls and softmax, casts, residual adds); at decode sizes each costs more in dispatch and
// allocation than in arithmetic. Here the only ATen call left is the int4 kernel (AWQ
// models); dense projections are the blocked kernel below, and everything between the
// projections is one fused loop each: add + RMSNorm (+ cast for the next matmul), q/k norm +
// rope + KV write + attention, SiLU * up (+ cast).
//
// Batch invariance by construction: every loop computes a row (and a row's attention head) with
// a fixed order of operations that depends on that row alone, threads split work by row and
// head, never inside a reduction, and attention reads exactly the row's own keys (no padding to
// a key bucket, so no masks). The projections keep it too: the int4 kernel computes each row
// alone, and the dense kernel sums each output in a fixed order.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "int4_bf16.h"

namespace {

using at::Tensor;
using bf16 = c10::BFloat16;

constexpr int kLanes = 16;

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16 from_float<bf16>(float x) { return bf16(x); }  // round to nearest even, as .to()

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// Sum of products in 16 lanes, the lanes then added as a fixed tree: vectorized, and the same
// result on every call of the same length (nothing depends on alignment or batch-mates).
inline float dot(const float* a, const float* b, int n) {
  if (n < kLanes) {  // tiny heads: lanes would only add zeros
    float s = 0.f;
    for (int d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
  }
  v16f acc = {};
  int d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    v16f x, y;
    std::memcpy(&x, a + d, sizeof x);
    std::memcpy(&y, b + d, sizeof y);
    acc += x * y;
  }
  const v8f s8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) +
                 __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  float s = (s4[0] + s4[2]) + (s4[1] + s4[3]);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// exp for the softmax and SiLU: Cephes' polynomial on a round-to-nearest range reduction
// (~1 ulp), written so the compiler vectorizes it (std::exp does not vectorize here).
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest, |t| < 2^22
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// 1 / RMS of x (n values), the factor RMSNorm scales by.
inline float rms_inverse(const float* x, int64_t n, float eps) {
  return 1.f / std::sqrt(dot(x, x, static_cast<int>(n)) / n + eps);
}

// h[r] += delta[r] (+ bias), then out[r] = RMSNorm(h[r]) * w, cast to the next matmul's input.
template <typename In, typename Out>
void add_rms_norm(float* h, const In* delta, const float* bias, const float* w, Out* out,
                  int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = h + r * width;
    if (delta != nullptr) {
      const In* d = delta + r * width;
      for (int64_t i = 0; i < width; ++i)
        x[i] = x[i] + (bias ? to_float(d[i]) + bias[i] : to_float(d[i]));
    }
    const float inv = rms_inverse(x, width, eps);
    Out* o = out + r * width;
    for (int64_t i = 0; i < width; ++i) o[i] = from_float<Out>(x[i] * inv * w[i]);
  }
}

// out[r] = SiLU(gate[r]) * up[r], gate and up side by side in `gate_up` (+ bias).
template <typename T>
void silu_mul(const T* gate_up, const float* bias, T* out, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * 2 * width;
    const T* u = g + width;
    T* o = out + r * width;
    for (int64_t i = 0; i < width; ++i) {
      const float gv = bias ? to_float(g[i]) + bias[i] : to_float(g[i]);
      const float uv = bias ? to_float(u[i]) + bias[width + i] : to_float(u[i]);
      o[i] = from_float<T>(gv / (1.f + exp_approx(-gv)) * uv);
    }
  }
}

// x (head_dim) normed in place by RMSNorm with weight w.
inline void head_rms_norm(float* x, const float* w, int hd, float eps) {
  const float inv = rms_inverse(x, hd, eps);
  for (int i = 0; i < hd; ++i) x[i] = x[i] * inv * w[i];
}

// Rotary embedding in place: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
inline void rope(float* x, const float* cos, const float* sin, int hd) {
  const int half = hd / 2;
  float rotated[512];
  for (int i = 0; i < half; ++i) rotated[i] = -x[half + i];
  for (int i = 0; i < half; ++i) rotated[half + i] = x[i];
  for (int i = 0; i < hd; ++i) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

// One query head over `keys` cached keys and values: softmax(q k^T * scale) v into `out`.
// kHd > 0 fixes the head size so q and the output accumulators stay in registers; 0 is any.
template <int kHd, typename T>
void attend_one(const float* q, const float* kc, const float* vc, int64_t keys, float scale,
                std::vector<float>& scores, float* acc, int64_t hd, T* out) {
  scores.resize(keys);
  float* sc = scores.data();
  if constexpr (kHd > 0) {
    for (int64_t j = 0; j < keys; ++j) sc[j] = dot(q, kc + j * kHd, kHd) * scale;
  } else {
    for (int64_t j = 0; j < keys; ++j) sc[j] = dot(q, kc + j * hd, static_cast<int>(hd)) * scale;
  }
  float top = sc[0];
  for (int64_t j = 1; j < keys; ++j) top = sc[j] > top ? sc[j] : top;
  for (int64_t j = 0; j < keys; ++j) sc[j] = exp_approx(sc[j] - top);
  float total = 0.f;
  for (int64_t j = 0; j < keys; ++j) total += sc[j];
  const float inv = 1.f / total;
  if constexpr (kHd > 0) {
    constexpr int kChunks = kHd / 16;
    v16f sum[kChunks] = {};
    for (int64_t j = 0; j < keys; ++j) {
      const float p = sc[j] * inv;
      const float* v = vc + j * kHd;
      for (int c = 0; c < kChunks; ++c) {
        v16f vv;
        std::memcpy(&vv, v + c * 16, sizeof vv);
        sum[c] += p * vv;
      }
    }
    std::memcpy(acc, sum, sizeof sum);
  } else {
    std::fill(acc, acc + hd, 0.f);
    for (int64_t j = 0; j < keys; ++j) {
      const float p = sc[j] * inv;
      const float* v = vc + j * hd;
      for (int64_t i = 0; i < hd; ++i) acc[i] += p * v[i];
    }
  }
  for (int64_t i = 0; i < hd; ++i) out[i] = from_float<T>(acc[i]);
}

struct AttentionShape {
  int64_t rows, q_heads, kv_heads, head_dim, max_len;
  float eps;
};

// For each (row, KV head): its new key and value (q/k norm, rope) written at the row's
// position in its slot, then attention of the KV head's query heads over keys 0..pos.
template <typename T>
void attention(const T* qkv, const float* bias, const float* cos, const float* sin,
               const int64_t* slots, const int64_t* positions, float* k_cache, float* v_cache,
               const float* q_norm, const float* k_norm, T* out, const AttentionShape& s) {
  const int64_t nq = s.q_heads, nkv = s.kv_heads, hd = s.head_dim, group = nq / nkv;
  const int64_t width = (nq + 2 * nkv) * hd;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  int64_t work = 0;
  for (int64_t r = 0; r < s.rows; ++r) work += (positions[r] + 1) * hd * nq;
  // Small steps run on one thread: waking the pool costs more than the arithmetic.
  const int64_t grain = work < (1 << 16) ? s.rows * nkv : 1;
  at::parallel_for(0, s.rows * nkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * hd), scores;
    std::vector<float> acc(hd);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / nkv, kvh = item % nkv;
      const int64_t pos = positions[r], keys = pos + 1;
      const T* row = qkv + r * width;
      auto load = [&](float* dst, int64_t col) {
        for (int64_t i = 0; i < hd; ++i)
          dst[i] = bias ? to_float(row[col + i]) + bias[col + i] : to_float(row[col + i]);
      };
      const float* c = cos + r * hd;
      const float* sn = sin + r * hd;
      const int64_t base = (slots[r] * nkv + kvh) * s.max_len;
      float* kc = k_cache + base * hd;
      float* vc = v_cache + base * hd;
      load(kc + pos * hd, (nq + kvh) * hd);
      if (k_norm) head_rms_norm(kc + pos * hd, k_norm, hd, s.eps);
      rope(kc + pos * hd, c, sn, hd);
      load(vc + pos * hd, (nq + nkv + kvh) * hd);
      for (int64_t g = 0; g < group; ++g) {
        float* qg = q.data() + g * hd;
        load(qg, (kvh * group + g) * hd);
        if (q_norm) head_rms_norm(qg, q_norm, hd, s.eps);
        rope(qg, c, sn, hd);
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + r * nq * hd + (kvh * group + g) * hd;
        if (hd == 64)
          attend_one<64>(q.data() + g * hd, kc, vc, keys, scale, scores, acc.data(), hd, o);
        else if (hd == 128)
          attend_one<128>(q.data() + g * hd, kc, vc, keys, scale, scores, acc.data(), hd, o);
        else
          attend_one<0>(q.data() + g * hd, kc, vc, keys, scale, scores, acc.data(), hd, o);
      }
    }
  });
}

// ---- Dense matmuls: x (rows, in) fp32 times a weight (out, in) in fp32, fp16 or bf16 ----
//
// A checkpoint saved in fp16 or bf16 and loaded as fp32 holds values that 16 bits represent
// exactly, so storing such a weight in that format loses nothing and halves the bytes a token
// reads (the lm_head is the largest matmul of a small model). Activations and sums stay fp32.
// The weight is laid out in blocks of 16 output features, (out / 16, in, 16), so a block is one
// contiguous read, and each output is a sum over `in` in order: the same for a row whatever
// else is in the batch, with no padding of rows to a fixed tile.

typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

enum class Stored { kFloat, kHalf, kBFloat16 };

template <Stored kind>
inline v16f widen(const void* ptr) {
  v16f f;
  if constexpr (kind == Stored::kFloat) {
    std::memcpy(&f, ptr, sizeof f);
  } else if constexpr (kind == Stored::kBFloat16) {
    v16u16 raw;
    std::memcpy(&raw, ptr, sizeof raw);
    const v16u32 bits = __builtin_convertvector(raw, v16u32) << 16;
    std::memcpy(&f, &bits, sizeof f);
  } else {  // F16C's conversion: the compiler lowers _Float16 casts to a library call here
    const auto* p = static_cast<const uint16_t*>(ptr);
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256 wide[2] = {lo, hi};
#endif
    std::memcpy(&f, &wide, sizeof f);
  }
  return f;
}

template <Stored kind>
constexpr int64_t stored_bytes() {
  return kind == Stored::kFloat ? 4 : 2;
}

// Outputs of `n` rows for one block of 16 output features; n fixed so the accumulators stay
// in registers.
template <Stored kind, int n>
inline void dense_block(const float* x, const char* wb, const float* bias, float* out,
                        int64_t in, int64_t out_stride) {
  v16f acc[n] = {};
  for (int64_t i = 0; i < in; ++i) {
    const v16f wi = widen<kind>(wb + i * 16 * stored_bytes<kind>());
    for (int r = 0; r < n; ++r) acc[r] += x[r * in + i] * wi;
  }
  if (bias != nullptr) {
    v16f b;
    std::memcpy(&b, bias, sizeof b);
    for (int r = 0; r < n; ++r) acc[r] += b;
  }
  for (int r = 0; r < n; ++r) std::memcpy(out + r * out_stride, &acc[r], sizeof(v16f));
}

template <Stored kind, int n>
inline void dense_tail(const float* x, const char* wb, const float* bias, float* out,
                       int64_t in, int64_t out_stride, int64_t rows) {
  if constexpr (n > 0) {
    if (rows == n) return dense_block<kind, n>(x, wb, bias, out, in, out_stride);
    dense_tail<kind, n - 1>(x, wb, bias, out, in, out_stride, rows);
  }
}

template <Stored kind>
void dense_blocks(const float* x, const char* w, const float* bias, float* out, int64_t rows,
                  int64_t in, int64_t out_padded) {
  constexpr int kRows = 8;
  const int64_t blocks = out_padded / 16;
  const int64_t block_bytes = in * 16 * stored_bytes<kind>();
  // Small matmuls run on one thread: waking the pool costs more than the arithmetic.
  const int64_t grain = rows * in * out_padded < (1 << 18) ? blocks : 16;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const char* wb = w + b * block_bytes;
      const float* bb = bias ? bias + b * 16 : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const float* xr = x + r0 * in;
        float* o = out + r0 * out_padded + b * 16;
        if (rows - r0 >= kRows)
          dense_block<kind, kRows>(xr, wb, bb, o, in, out_padded);
        else
          dense_tail<kind, kRows - 1>(xr, wb, bb, o, in, out_padded, rows - r0);
      }
    }
  });
}

// (out, in) fp32/fp16/bf16 -> the blocked layout `dense` reads, `out` padded to 16 with zeros.
Tensor pack_dense(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "a weight is (out, in)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kHalf ||
                  weight.scalar_type() == at::kBFloat16,
              "weights in fp32, fp16 or bf16");
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t padded = (out + 15) / 16 * 16;
  Tensor w = at::constant_pad_nd(weight.detach(), {0, 0, 0, padded - out});
  return w.view({padded / 16, 16, in}).transpose(1, 2).contiguous();
}

// A bias of `out` features as the kernel reads it: fp32, padded like the packed weight.
Tensor pad_bias(const Tensor& bias, const Tensor& packed, int64_t out) {
  if (!bias.numel()) return Tensor();
  TORCH_CHECK(bias.numel() == out, "bias of ", bias.numel(), " for ", out, " outputs");
  return at::constant_pad_nd(bias.to(at::kFloat), {0, packed.size(0) * 16 - out}).contiguous();
}

// x (rows, in) fp32 times a `pack_dense` weight, plus a `pad_bias` bias (or undefined):
// (rows, out) fp32.
Tensor dense_padded(const Tensor& x, const Tensor& packed, int64_t out, const Tensor& b) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packed.dim() == 3);
  const Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1), padded = packed.size(0) * 16;
  TORCH_CHECK(packed.size(1) == in && packed.size(2) == 16 && out <= padded, "shape mismatch");
  Tensor result = at::empty({rows, padded}, xc.options());
  const auto* w = static_cast<const char*>(packed.data_ptr());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* o = result.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  switch (packed.scalar_type()) {
    case at::kFloat:
      dense_blocks<Stored::kFloat>(xp, w, bp, o, rows, in, padded);
      break;
    case at::kHalf:
      dense_blocks<Stored::kHalf>(xp, w, bp, o, rows, in, padded);
      break;
    default:
      dense_blocks<Stored::kBFloat16>(xp, w, bp, o, rows, in, padded);
  }
  return padded == out ? result : result.narrow(1, 0, out);
}

Tensor dense(const Tensor& x, const Tensor& packed, int64_t out, const Tensor& bias) {
  return dense_padded(x, packed, out, pad_bias(bias, packed, out));
}

// A projection: an int4 kernel (bf16 in and out, bias left to the consumer: the native
// AVX512-BF16 one where the weights were repacked for it, else ATen's) or the dense kernel
// above (fp32 in and out, bias inside).
struct Projection {
  bool int4 = false;
  Tensor weight, scales_and_zeros, bias, native_scale, native_zero;
  int64_t group_size = 0, out_features = 0;

  Tensor operator()(const Tensor& x) const {
    if (native_scale.defined())
      return int4_bf16::matmul(x, weight, native_scale, native_zero, out_features, group_size);
    if (int4) return at::_weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros);
    return dense_padded(x, weight, out_features, bias);
  }

  // The bias the consumer adds (int4 only), as a raw pointer or null.
  const float* consumer_bias() const {
    return int4 && bias.defined() ? bias.data_ptr<float>() : nullptr;
  }
};

// parts: int4 -> (qweight, scales_and_zeros, bias or empty[, native packed, scale, zero]);
// dense -> (pack_dense weight, bias or empty, out features as a one-element tensor).
Projection make_projection(const std::vector<Tensor>& parts, int64_t group_size) {
  Projection p;
  p.int4 = group_size > 0;
  p.group_size = group_size;
  p.weight = parts.at(0);
  if (p.int4) {
    p.scales_and_zeros = parts.at(1);
    p.out_features = p.scales_and_zeros.size(1);
    if (parts.at(2).numel()) p.bias = parts[2].to(at::kFloat).contiguous();
    if (parts.size() == 6) {
      p.weight = parts[3];
      p.native_scale = parts[4];
      p.native_zero = parts[5];
    }
  } else {
    p.out_features = parts.at(2).item<int64_t>();
    p.bias = pad_bias(parts.at(1), p.weight, p.out_features);
  }
  return p;
}

class Decoder {
 public:
  Decoder(std::vector<std::vector<Tensor>> layer_tensors, std::vector<int64_t> dims,
          double eps, int64_t group_size, Tensor final_norm)
      : final_norm_(final_norm.to(at::kFloat).contiguous()), eps_(static_cast<float>(eps)) {
    // dims: hidden, q_heads, kv_heads, head_dim, intermediate, max_len
    TORCH_CHECK(dims.size() == 6, "dims: hidden, q_heads, kv_heads, head_dim, inter, max_len");
    hidden_ = dims[0], q_heads_ = dims[1], kv_heads_ = dims[2], head_dim_ = dims[3];
    inter_ = dims[4], max_len_ = dims[5];
    TORCH_CHECK(head_dim_ <= 512 && head_dim_ % 2 == 0, "head_dim must be even and <= 512");
    TORCH_CHECK(q_heads_ % kv_heads_ == 0, "query heads must be a multiple of KV heads");
    int4_ = group_size > 0;
    // Per layer: in_norm, post_norm, k_cache, v_cache, q_norm?, k_norm?, then the four
    // projections' tensors, each a (size, tensors...) run: qkv, o, gate_up, down.
    for (auto& t : layer_tensors) {
      Layer l;
      size_t k = 0;
      l.in_norm = t.at(k++).to(at::kFloat).contiguous();
      l.post_norm = t.at(k++).to(at::kFloat).contiguous();
      l.k_cache = t.at(k++);
      l.v_cache = t.at(k++);
      TORCH_CHECK(l.k_cache.is_contiguous() && l.k_cache.scalar_type() == at::kFloat,
                  "KV cache must be contiguous fp32");
      const Tensor qn = t.at(k++), kn = t.at(k++);
      if (qn.numel()) l.q_norm = qn.to(at::kFloat).contiguous();
      if (kn.numel()) l.k_norm = kn.to(at::kFloat).contiguous();
      Projection* targets[] = {&l.qkv, &l.o, &l.gate_up, &l.down};
      for (Projection* p : targets) {
        const int64_t n = t.at(k++).item<int64_t>();
        std::vector<Tensor> parts(t.begin() + k, t.begin() + k + n);
        k += n;
        *p = make_projection(parts, group_size);
      }
      layers_.push_back(std::move(l));
    }
  }

  // h (rows, hidden) fp32 embeddings; cos, sin (rows, head_dim) fp32; slots, positions (rows,)
  // int64. Writes each row's K/V at its position and returns the final normed hidden states.
  Tensor step(Tensor h, const Tensor& cos, const Tensor& sin, const Tensor& slots,
              const Tensor& positions) {
    TORCH_CHECK(h.dim() == 2 && h.size(1) == hidden_ && h.scalar_type() == at::kFloat);
    h = h.contiguous().clone();
    const int64_t rows = h.size(0);
    const Tensor c = cos.contiguous(), s = sin.contiguous();
    const Tensor sl = slots.contiguous(), ps = positions.contiguous();
    TORCH_CHECK(c.numel() == rows * head_dim_ && s.numel() == rows * head_dim_);
    TORCH_CHECK(sl.numel() == rows && ps.numel() == rows, "one slot and position a row");
    TORCH_CHECK(sl.scalar_type() == at::kLong && ps.scalar_type() == at::kLong);
    // The kernels write the cache through raw pointers: an index past it would corrupt memory.
    const int64_t* pos = ps.data_ptr<int64_t>();
    const int64_t* slot = sl.data_ptr<int64_t>();
    const int64_t cache_slots = layers_.empty() ? 0 : layers_[0].k_cache.size(0);
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < max_len_, "position ", pos[r], " out of the cache");
      TORCH_CHECK(slot[r] >= 0 && slot[r] < cache_slots, "slot ", slot[r], " out of the cache");
    }
    return int4_ ? run<bf16>(h, c, s, sl, ps) : run<float>(h, c, s, sl, ps);
  }

 private:
  struct Layer {
    Tensor in_norm, post_norm, k_cache, v_cache, q_norm, k_norm;
    Projection qkv, o, gate_up, down;
  };

  template <typename T>
  Tensor run(Tensor& h, const Tensor& cos, const Tensor& sin, const Tensor& slots,
             const Tensor& positions) {
    const int64_t rows = h.size(0);
    const auto act = int4_ ? at::kBFloat16 : at::kFloat;
    const auto opts = h.options().dtype(act);
    Tensor x = at::empty({rows, hidden_}, opts);
    Tensor attn = at::empty({rows, q_heads_ * head_dim_}, opts);
    Tensor gated = at::empty({rows, inter_}, opts);
    float* hp = h.data_ptr<float>();
    const AttentionShape shape{rows, q_heads_, kv_heads_, head_dim_, max_len_, eps_};
    Tensor delta;  // the previous layer's down projection, added before the next norm
    const float* delta_bias = nullptr;
    for (const Layer& l : layers_) {
      add_rms_norm<T, T>(hp, delta.defined() ? delta.data_ptr<T>() : nullptr, delta_bias,
                         l.in_norm.data_ptr<float>(), x.data_ptr<T>(), rows, hidden_, eps_);
      const Tensor qkv = l.qkv(x).contiguous();
      attention<T>(qkv.data_ptr<T>(), l.qkv.consumer_bias(), cos.data_ptr<float>(),
                   sin.data_ptr<float>(), slots.data_ptr<int64_t>(),
                   positions.data_ptr<int64_t>(), l.k_cache.data_ptr<float>(),
                   l.v_cache.data_ptr<float>(),
                   l.q_norm.defined() ? l.q_norm.data_ptr<float>() : nullptr,
                   l.k_norm.defined() ? l.k_norm.data_ptr<float>() : nullptr,
                   attn.data_ptr<T>(), shape);
      const Tensor o = l.o(attn).contiguous();
      add_rms_norm<T, T>(hp, o.data_ptr<T>(), l.o.consumer_bias(), l.post_norm.data_ptr<float>(),
                         x.data_ptr<T>(), rows, hidden_, eps_);
      const Tensor gate_up = l.gate_up(x).contiguous();
      silu_mul<T>(gate_up.data_ptr<T>(), l.gate_up.consumer_bias(), gated.data_ptr<T>(), rows,
                  inter_);
      delta = l.down(gated).contiguous();
      delta_bias = l.down.consumer_bias();
    }
    Tensor out = at::empty({rows, hidden_}, h.options());
    add_rms_norm<T, float>(hp, delta.defined() ? delta.data_ptr<T>() : nullptr, delta_bias,
                           final_norm_.data_ptr<float>(), out.data_ptr<float>(), rows, hidden_,
                           eps_);
    return out;
  }

  std::vector<Layer> layers_;
  Tensor final_norm_;
  float eps_;
  bool int4_ = false;
  int64_t hidden_ = 0, q_heads_ = 0, kv_heads_ = 0, head_dim_ = 0, inter_ = 0, max_len_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<std::vector<Tensor>>, std::vector<int64_t>, double, int64_t,
                          Tensor>())
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("pack_dense", &pack_dense);
  m.def("dense", &dense, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("int4_bf16_available") = int4_bf16::kAvailable;
  m.def("int4_pack", &int4_bf16::pack);
  m.def("int4_mm", &int4_bf16::matmul, pybind11::call_guard<pybind11::gil_scoped_release>());
}
