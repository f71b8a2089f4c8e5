// Blockwise scaled dot-product attention on CPU: the forward, one pass per query
// block, and its backward (AttentionBackwardOp, below), which recomputes each block's
// probabilities from the forward's logsumexp.
//
// Shape letters: B batch, T query length, S key length, N query heads, K key/value
// heads (K divides N), G = N / K, H query/key head dim, D value head dim.
// query [B, T, N, H], key [B, S, K, H], value [B, S, K, D]; bias (float32) and mask
// (bool) are rank 4 and broadcast to [B, N, T, S]. Outputs: [B, T, N, D] in the input
// dtype and the per-row logsumexp [B, N, T] in float32.
//
// The semantics are those of fastlayers.kernels.attention's reference: scores in
// float32, masked scores replaced by the mask value, a row with no visible key gives
// zeros, dropout by the same position hash. Key/value heads are packed once per call
// into float32 panels (kPanel), so every query head of a group reads them without a
// repeat; key and value rows no score can see are zeroed while packing, so NaN
// there reaches no product.
//
// Per (batch, query head, query block): Q·Kᵀ for one key block into an L1/L2-sized
// score tile, a fused pass (bias, mask, running max, exp, row sum, dropout) and P·V
// into a float32 accumulator rescaled by the running max. Causal key blocks wholly
// above the diagonal are never visited.
//
// ISA dispatch: the primitives below come as tables (kTables, best first), chosen at
// run time from what the CPU reports (isa.h), each compiled with a per-function
// target: portable, AVX2+FMA, AVX-512, and for bfloat16 inputs AVX512-BF16 and AMX,
// whose forward multiplies pairs of bfloat16 (keys and values packed as pairs
// instead of float32 panels; the softmax and the backward stay in float32).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

#include "isa.h"

namespace fastlayers {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace errors = tensorflow::errors;

// Packed operands are panels of kPanel floats: keys as [S/16][H][16] (16 keys'
// values of one head-dim index side by side), values as [D/16][S][16] (16 value
// dims of one key). A micro-kernel then streams one contiguous panel; a row-major
// operand would stride by a power of two and thrash a few L1 sets.
constexpr int64_t kPanel = 16;
// The mask value of fastlayers.kernels.precision.mask_value(float32): finite, so a
// row with every key masked never computes inf - inf.
constexpr float kFloor = -0.7f * 3.4028234663852886e38f;

// The vector exps' constants (Exp8, Exp16): Cephes' expf, ln 2 in two parts for the
// range reduction, the polynomial's coefficients from r^5 down to r^2, and the shift
// that rounds x·log2(e) and leaves k + 127 in the low bits.
namespace exp_constants {
constexpr float kLowest = -88.0f, kLog2e = 1.44269504088896341f, kShift = 12582912.0f + 127.0f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kC5 = 1.9875691500E-4f, kC4 = 1.3981999507E-3f, kC3 = 8.3334519073E-3f, kC2 = 4.1665795894E-2f,
                kC1 = 1.6666665459E-1f, kC0 = 5.0000001201E-1f;
}  // namespace exp_constants

// The body of the vector exp on W-bit vectors (Exp8, Exp16: W = 256, 512), spelled once
// for both widths from their `_mm<W>_` intrinsics: each width is defined inside its own
// target region, which a shared template cannot be.
//
// exp(x) for x < 88 (a softmax's shifted scores are <= 0), or NaN (passed through).
// Cephes' polynomial (about 1.4 ulp) in Estrin's order, and k = round(x·log2 e) by
// adding 1.5·2^23 + 127, which leaves k + 127 in the low bits: shifted into the
// exponent field, that is 2^k. Thirteen instructions where Horner's order with a floor
// and a conversion takes seventeen, and half the dependency chain. Below -88,
// k + 127 <= 0 and the result is 0 (exp(-88) is 6e-39, under float32's normal range).
#define FASTLAYERS_VECTOR_EXP(W, x)                                                                  \
  using namespace exp_constants;                                                                     \
  x = _mm##W##_max_ps(_mm##W##_set1_ps(kLowest), x);                                                 \
  const auto magic = _mm##W##_set1_ps(kShift);                                                       \
  const auto shifted = _mm##W##_fmadd_ps(x, _mm##W##_set1_ps(kLog2e), magic);                        \
  const auto k = _mm##W##_sub_ps(shifted, magic);                                                    \
  auto r = _mm##W##_fnmadd_ps(k, _mm##W##_set1_ps(kLn2High), x);                                     \
  r = _mm##W##_fnmadd_ps(k, _mm##W##_set1_ps(kLn2Low), r);                                           \
  const auto r2 = _mm##W##_mul_ps(r, r);                                                             \
  const auto p01 = _mm##W##_fmadd_ps(_mm##W##_set1_ps(kC1), r, _mm##W##_set1_ps(kC0));               \
  const auto p23 = _mm##W##_fmadd_ps(_mm##W##_set1_ps(kC3), r, _mm##W##_set1_ps(kC2));               \
  const auto p45 = _mm##W##_fmadd_ps(_mm##W##_set1_ps(kC5), r, _mm##W##_set1_ps(kC4));               \
  const auto p25 = _mm##W##_fmadd_ps(p45, r2, p23);                                                  \
  const auto p05 = _mm##W##_fmadd_ps(p25, r2, p01);                                                  \
  const auto y = _mm##W##_add_ps(_mm##W##_fmadd_ps(p05, r2, r), _mm##W##_set1_ps(1.0f));             \
  return _mm##W##_mul_ps(y, _mm##W##_castsi##W##_ps(_mm##W##_slli_epi32(_mm##W##_castps_si##W(shifted), 23)));

// ---------------------------------------------------------------------------------
// Dropout: the position hash of kernels/attention.py (`_mix`, `_dropout_multiplier`).

// The hash's multipliers (Mix, Mix8, Mix16).
constexpr uint32_t kMixA = 0x7FEB352Du, kMixB = 0x846CA68Bu;

// The body of Mix on W-bit vectors of 32-bit lanes (Mix8, Mix16), as FASTLAYERS_VECTOR_EXP.
#define FASTLAYERS_VECTOR_MIX(W, x)                                     \
  x = _mm##W##_xor_si##W(x, _mm##W##_srli_epi32(x, 16));                \
  x = _mm##W##_mullo_epi32(x, _mm##W##_set1_epi32(static_cast<int>(kMixA))); \
  x = _mm##W##_xor_si##W(x, _mm##W##_srli_epi32(x, 15));                \
  x = _mm##W##_mullo_epi32(x, _mm##W##_set1_epi32(static_cast<int>(kMixB))); \
  x = _mm##W##_xor_si##W(x, _mm##W##_srli_epi32(x, 16));                \
  return x;

inline uint32_t Mix(uint32_t x) {
  x ^= x >> 16;
  x *= kMixA;
  x ^= x >> 15;
  x *= kMixB;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t seed0_mixed = 0;  // _mix(seed0)
  uint32_t seed1 = 0;        // words[-1] ^ 0x9E3779B9
  uint32_t threshold = 0;    // keep iff (bits >> 8) >= threshold, i.e. uniform >= rate
  float keep_scale = 1.0f;   // 1 / (1 - rate), rounded to float32 as the reference does
};

// ---------------------------------------------------------------------------------
// One score tile's row: everything the fused pass needs to know about it.

struct RowContext {
  const float* bias;       // bias row, or nullptr
  int64_t bias_stride;     // 0 when the bias broadcasts over keys
  const bool* mask;        // mask row, or nullptr
  int64_t mask_stride;     // 0 when the mask broadcasts over keys
  int64_t keys;            // columns that exist (bias and mask rows end there)
  int64_t limit;           // columns at or past this are invalid (<= keys; causal)
  uint32_t row_hash;       // _mix(row ^ _mix(seed0)) when dropout is on
  const uint32_t* col_hash;  // _mix(s ^ seed1) of the block's columns
};

// The three primitives, per ISA.
//   qk:      scores[r*ld_s + c] = sum_h q[r*H + h] * K[c][h], r < rows, c < cols, with
//            keys a [cols/16][H][16] panel array (cols a multiple of 16)
//   softmax: one score row in place: masked, exponentiated against the new running
//            max, dropped; returns the row sum (before dropout) and updates *max
//   pv:      out[r*ld_o + d] += sum_c p[r*ld_s + c] * V[c][d], d < ld_o (a multiple
//            of 16), with values panels of 16 dims, panel i at values + i*panel_stride
struct Primitives {
  const char* name;
  void (*qk)(const float* q, int64_t rows, int64_t head_dim, const float* keys, int64_t ld_s,
             int64_t cols, float* scores);
  float (*softmax)(float* row, int64_t cols, const RowContext& ctx, const Dropout& drop,
                   float* max);
  void (*pv)(const float* p, int64_t rows, int64_t ld_s, int64_t cols, const float* values,
             int64_t panel_stride, int64_t ld_o, float* out);
  // The backward's (see AttentionBackwardOp):
  //   gemm:   c[r*ldc + n] (+)= sum_k a[r*a_row + k*a_col] * b_n[k*ldb + n % 16] for
  //           r < rows, n < cols (a multiple of 16), k < depth, where b_n is panel
  //           n / 16 at b + (n / 16) * panel_stride; a_row == 1 or a_col == 1, so a
  //           transposed left operand (Pᵀ, dSᵀ) is read in place
  //   probs:  p[c] = exp(scores[c] + bias - lse) where valid, else 0; with dropout
  //           also pd[c] = p[c] times the dropout multiplier
  //   dscore: ds[c] = pd[c]·dp[c] - p[c]·delta (ds may be dp)
  void (*gemm)(const float* a, int64_t a_row, int64_t a_col, int64_t rows, int64_t depth, const float* b,
               int64_t panel_stride, int64_t ldb, int64_t cols, float* c, int64_t ldc, bool accumulate);
  void (*probs)(const float* scores, int64_t cols, const RowContext& ctx, const Dropout& drop, float lse,
                float* p, float* pd);
  void (*dscore)(const float* p, const float* pd, const float* dp, int64_t cols, float delta, float* ds);
  // The forward's bfloat16 products, in tables whose CPU multiplies pairs of bfloat16
  // (nullptr elsewhere: bfloat16 inputs then take the float32 primitives after one
  // conversion). Operands are pairs of bfloat16 in a uint32, the lower half first:
  //   qk_pairs: scores[r*ld_s + c] = scale · sum_i q[r*pairs + i] · K[c][i], i < pairs,
  //             with keys a [cols/16][pairs][16] array of pairs of head dims
  //   to_pairs: pairs[i] = (bf16(p[2i]), bf16(p[2i+1])), 2i < cols, rounded to nearest
  //             even
  //   pv_pairs: out[r*ld_o + d] += sum_c p_r[c] · V[c][d] for c < keys (p rows of ld_p
  //             pairs), with values panels of 16 dims, [S/2][16] pairs of keys, panel i
  //             at values + i*panel_stride; a pair's key past `keys` is never read
  void (*qk_pairs)(const uint32_t* q, int64_t rows, int64_t pairs, const uint32_t* keys, int64_t ld_s,
                   int64_t cols, float scale, float* scores);
  void (*to_pairs)(const float* p, int64_t cols, uint32_t* pairs);
  void (*pv_pairs)(const uint32_t* p, int64_t rows, int64_t ld_p, int64_t keys, const uint32_t* values,
                   int64_t panel_stride, int64_t ld_o, float* out);
  // What the pairs products need of their operands' sizes (0 as 1): the head dim's
  // pairs, the rows of q, p, scores and out, and a p row's pairs come in whole
  // multiples of it, the padding zeros (p rows past cols/2 too).
  int64_t pair_quantum;
};

// ---------------------------------------------------------------------------------
// Portable primitives: plain loops the compiler vectorizes for the baseline ISA.

void QkPortable(const float* q, int64_t rows, int64_t head_dim, const float* keys, int64_t ld_s,
                int64_t cols, float* scores) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * ld_s;
    std::fill(s, s + cols, 0.0f);
    for (int64_t c = 0; c < cols; c += kPanel) {
      const float* panel = keys + c * head_dim;
      for (int64_t h = 0; h < head_dim; ++h) {
        const float a = q[r * head_dim + h];
        for (int64_t l = 0; l < kPanel; ++l) s[c + l] += a * panel[h * kPanel + l];
      }
    }
  }
}

inline bool ValidAt(const RowContext& ctx, int64_t c) {
  if (c >= ctx.limit) return false;
  return ctx.mask == nullptr || ctx.mask[c * ctx.mask_stride];
}

inline float DropScalar(const RowContext& ctx, const Dropout& drop, int64_t c) {
  const uint32_t bits = Mix(ctx.row_hash ^ ctx.col_hash[c]);
  return (bits >> 8) >= drop.threshold ? drop.keep_scale : 0.0f;
}

float SoftmaxPortable(float* row, int64_t cols, const RowContext& ctx, const Dropout& drop,
                      float* max) {
  float peak = *max;
  for (int64_t c = 0; c < cols; ++c) {
    float s = row[c];
    if (ctx.bias != nullptr && c < ctx.keys) s += ctx.bias[c * ctx.bias_stride];
    s = ValidAt(ctx, c) ? s : kFloor;
    row[c] = s;
    peak = std::max(peak, s);
  }
  float sum = 0.0f;
  for (int64_t c = 0; c < cols; ++c) {
    // Invalid scores hold exactly kFloor (NaN compares unequal, so a visible NaN
    // stays NaN, as in the reference).
    const float p = row[c] != kFloor ? std::exp(row[c] - peak) : 0.0f;
    sum += p;
    row[c] = drop.on ? p * DropScalar(ctx, drop, c) : p;
  }
  *max = peak;
  return sum;
}

void PvPortable(const float* p, int64_t rows, int64_t ld_s, int64_t cols, const float* values,
                int64_t panel_stride, int64_t ld_o, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < ld_o; d += kPanel) {
      float* o = out + r * ld_o + d;
      const float* panel = values + (d / kPanel) * panel_stride;
      for (int64_t c = 0; c < cols; ++c) {
        const float a = p[r * ld_s + c];
        for (int64_t l = 0; l < kPanel; ++l) o[l] += a * panel[c * kPanel + l];
      }
    }
  }
}

void GemmPortable(const float* a, int64_t a_row, int64_t a_col, int64_t rows, int64_t depth, const float* b,
                  int64_t panel_stride, int64_t ldb, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < cols; n += kPanel) {
      float acc[kPanel];
      for (int64_t l = 0; l < kPanel; ++l) acc[l] = accumulate ? c[r * ldc + n + l] : 0.0f;
      const float* panel = b + (n / kPanel) * panel_stride;
      for (int64_t k = 0; k < depth; ++k) {
        const float x = a[r * a_row + k * a_col];
        for (int64_t l = 0; l < kPanel; ++l) acc[l] += x * panel[k * ldb + l];
      }
      std::memcpy(c + r * ldc + n, acc, sizeof(acc));
    }
  }
}

void ProbsPortable(const float* scores, int64_t cols, const RowContext& ctx, const Dropout& drop, float lse,
                   float* p, float* pd) {
  for (int64_t c = 0; c < cols; ++c) {
    float s = scores[c];
    if (ctx.bias != nullptr && c < ctx.keys) s += ctx.bias[c * ctx.bias_stride];
    // A select, not a product: a NaN or Inf score where the row sees nothing stays out.
    p[c] = ValidAt(ctx, c) ? std::exp(s - lse) : 0.0f;
    if (drop.on) pd[c] = p[c] * DropScalar(ctx, drop, c);
  }
}

void DscorePortable(const float* p, const float* pd, const float* dp, int64_t cols, float delta, float* ds) {
  for (int64_t c = 0; c < cols; ++c) ds[c] = pd[c] * dp[c] - p[c] * delta;
}

constexpr Primitives kPortable = {"portable", QkPortable, SoftmaxPortable, PvPortable,
                                  GemmPortable, ProbsPortable, DscorePortable};

// ---------------------------------------------------------------------------------
// AVX2+FMA primitives.

#ifdef FASTLAYERS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline __m256 Exp8(__m256 x) { FASTLAYERS_VECTOR_EXP(256, x) }

inline __m256i Mix8(__m256i x) { FASTLAYERS_VECTOR_MIX(256, x) }

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float HorizontalSum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// M rows × 16 columns of a product, accumulated over depth in 2·M registers: Q·Kᵀ,
// P·V and the backward's gemms. Transposed: a's rows are adjacent (a_row == 1), so
// one step's M values are contiguous.
template <int M, bool Transposed>
inline void GemmTile(const float* a, int64_t a_row, int64_t a_col, int64_t depth, const float* panel,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  __m256 acc[M][2];
  _Pragma("GCC unroll 8")
  for (int i = 0; i < M; ++i) {
    acc[i][0] = accumulate ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    acc[i][1] = accumulate ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(panel + k * ldb + 8);
    _Pragma("GCC unroll 8")
    for (int i = 0; i < M; ++i) {
      const __m256 x = _mm256_broadcast_ss(Transposed ? a + k * a_col + i : a + i * a_row + k);
      acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
    }
  }
  _Pragma("GCC unroll 8")
  for (int i = 0; i < M; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[i][0]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[i][1]);
  }
}

template <bool Transposed>
void GemmRows(const float* a, int64_t a_row, int64_t a_col, int64_t rows, int64_t depth, const float* b,
              int64_t panel_stride, int64_t ldb, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  for (int64_t n = 0; n < cols; n += kPanel) {
    const float* panel = b + (n / kPanel) * panel_stride;
    int64_t r = 0;
    for (; r + 6 <= rows; r += 6) {
      GemmTile<6, Transposed>(a + r * a_row, a_row, a_col, depth, panel, ldb, c + r * ldc + n, ldc, accumulate);
    }
    const float* ar = a + r * a_row;
    float* cr = c + r * ldc + n;
    switch (rows - r) {
      case 5: GemmTile<5, Transposed>(ar, a_row, a_col, depth, panel, ldb, cr, ldc, accumulate); break;
      case 4: GemmTile<4, Transposed>(ar, a_row, a_col, depth, panel, ldb, cr, ldc, accumulate); break;
      case 3: GemmTile<3, Transposed>(ar, a_row, a_col, depth, panel, ldb, cr, ldc, accumulate); break;
      case 2: GemmTile<2, Transposed>(ar, a_row, a_col, depth, panel, ldb, cr, ldc, accumulate); break;
      case 1: GemmTile<1, Transposed>(ar, a_row, a_col, depth, panel, ldb, cr, ldc, accumulate); break;
      default: break;
    }
  }
}

// Q·Kᵀ: the head dim is the depth, each key panel holds 16 keys' head dims contiguously.
void QkAvx2(const float* q, int64_t rows, int64_t head_dim, const float* keys, int64_t ld_s,
            int64_t cols, float* scores) {
  GemmRows<false>(q, head_dim, 1, rows, head_dim, keys, kPanel * head_dim, kPanel, cols, scores, ld_s,
                  /*accumulate=*/false);
}

// P·V added to out: the key block is the depth; `values` holds, per panel of 16 output
// columns, those columns of every key contiguously.
void PvAvx2(const float* p, int64_t rows, int64_t ld_s, int64_t cols, const float* values,
            int64_t panel_stride, int64_t ld_o, float* out) {
  GemmRows<false>(p, ld_s, 1, rows, cols, values, panel_stride, kPanel, ld_o, out, ld_o, /*accumulate=*/true);
}

// Validity of columns c..c+7 as a lane mask (all ones where valid).
inline __m256 Valid8(const RowContext& ctx, int64_t c) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ctx.limit)), index);
  if (ctx.mask != nullptr) {
    if (ctx.mask_stride == 0) {
      if (!ctx.mask[0]) valid = _mm256_setzero_si256();
    } else {
      int64_t bytes;
      std::memcpy(&bytes, ctx.mask + c, sizeof(bytes));
      const __m256i m = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
      valid = _mm256_andnot_si256(_mm256_cmpeq_epi32(m, _mm256_setzero_si256()), valid);
    }
  }
  return _mm256_castsi256_ps(valid);
}

// The bias of columns c..c+7 (ctx.bias set), never read past the row's last key
// (those columns are invalid anyway).
inline __m256 Bias8(const RowContext& ctx, int64_t c) {
  if (ctx.bias_stride == 0) return _mm256_set1_ps(ctx.bias[0]);
  if (c + 8 <= ctx.keys) return _mm256_loadu_ps(ctx.bias + c);
  alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = c; k < ctx.keys; ++k) tail[k - c] = ctx.bias[k];
  return _mm256_load_ps(tail);
}

// Valid8, never reading mask bytes past the row's last visible key (ctx.limit).
inline __m256 BoundedValid8(const RowContext& ctx, int64_t c) {
  if (ctx.mask == nullptr || ctx.mask_stride == 0 || c + 8 <= ctx.limit) return Valid8(ctx, c);
  alignas(8) bool tail[8] = {false, false, false, false, false, false, false, false};
  for (int64_t k = c; k < std::min<int64_t>(c + 8, ctx.limit); ++k) tail[k - c] = ctx.mask[k];
  RowContext bounded = ctx;
  bounded.mask = tail - c;
  return Valid8(bounded, c);
}

// SoftmaxAvx2's second pass: p = exp(s - m) over the row, zero where a column was
// masked (columns from `clean` on may hold the floor), dropped when kDrop; returns
// the sum before dropout. Its own function per kDrop, so the plain loop keeps every
// constant in a register.
template <bool kDrop>
inline float ExpPass(float* row, int64_t cols, int64_t clean, float max, const RowContext& ctx,
                     const Dropout& drop) {
  const __m256 floor = _mm256_set1_ps(kFloor);
  const __m256 m = _mm256_set1_ps(max);
  const __m256i row_hash = _mm256_set1_epi32(static_cast<int>(ctx.row_hash));
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(drop.threshold));
  const __m256 keep_scale = _mm256_set1_ps(drop.keep_scale);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t c = 0; c < cols; c += 8) {
    const __m256 s = _mm256_loadu_ps(row + c);
    __m256 p = Exp8(_mm256_sub_ps(s, m));
    // Only a masked column holds the floor (a row with every column masked has the
    // floor as its max, and exp(0) must not count).
    if (c >= clean) p = _mm256_and_ps(p, _mm256_cmp_ps(s, floor, _CMP_NEQ_UQ));
    sum = _mm256_add_ps(sum, p);
    if (kDrop) {
      const __m256i cols_hash = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ctx.col_hash + c));
      const __m256i bits = _mm256_srli_epi32(Mix8(_mm256_xor_si256(row_hash, cols_hash)), 8);
      // bits < 2^24 and threshold <= 2^24: a signed compare is exact.
      const __m256i dropped = _mm256_cmpgt_epi32(threshold, bits);
      p = _mm256_andnot_ps(_mm256_castsi256_ps(dropped), _mm256_mul_ps(p, keep_scale));
    }
    _mm256_storeu_ps(row + c, p);
  }
  return HorizontalSum(sum);
}

float SoftmaxAvx2(float* row, int64_t cols, const RowContext& ctx, const Dropout& drop,
                  float* max) {
  // cols is a multiple of 16, and the mask row is read 8 columns at a time only
  // below ctx.limit (the columns that exist): past it every lane is invalid anyway.
  // Without bias or mask, the whole vectors below ctx.limit are scores as they are.
  const int64_t clean = ctx.bias == nullptr && ctx.mask == nullptr ? ctx.limit / 8 * 8 : 0;
  const __m256 floor = _mm256_set1_ps(kFloor);
  __m256 peak = _mm256_set1_ps(*max);
  int64_t c = 0;
  for (; c < clean; c += 8) peak = _mm256_max_ps(peak, _mm256_loadu_ps(row + c));
  for (; c < cols; c += 8) {
    __m256 s = _mm256_loadu_ps(row + c);
    if (ctx.bias != nullptr) s = _mm256_add_ps(s, Bias8(ctx, c));
    s = _mm256_blendv_ps(floor, s, BoundedValid8(ctx, c));
    _mm256_storeu_ps(row + c, s);
    peak = _mm256_max_ps(peak, s);
  }
  *max = HorizontalMax(peak);
  return drop.on ? ExpPass<true>(row, cols, clean, *max, ctx, drop)
                 : ExpPass<false>(row, cols, clean, *max, ctx, drop);
}

void GemmAvx2(const float* a, int64_t a_row, int64_t a_col, int64_t rows, int64_t depth, const float* b,
              int64_t panel_stride, int64_t ldb, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  if (a_row == 1 && a_col != 1) {
    GemmRows<true>(a, a_row, a_col, rows, depth, b, panel_stride, ldb, cols, c, ldc, accumulate);
  } else {
    GemmRows<false>(a, a_row, a_col, rows, depth, b, panel_stride, ldb, cols, c, ldc, accumulate);
  }
}

// ProbsAvx2's loop, its own function per kDrop as ExpPass.
template <bool kDrop>
inline void ProbsPass(const float* scores, int64_t cols, int64_t clean, const RowContext& ctx,
                      const Dropout& drop, float lse, float* p, float* pd) {
  const __m256 offset = _mm256_set1_ps(lse);
  const __m256i row_hash = _mm256_set1_epi32(static_cast<int>(ctx.row_hash));
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(drop.threshold));
  const __m256 keep_scale = _mm256_set1_ps(drop.keep_scale);
  for (int64_t c = 0; c < cols; c += 8) {
    __m256 s = _mm256_loadu_ps(scores + c);
    if (ctx.bias != nullptr) s = _mm256_add_ps(s, Bias8(ctx, c));
    __m256 x = Exp8(_mm256_sub_ps(s, offset));
    if (c >= clean) x = _mm256_and_ps(x, BoundedValid8(ctx, c));
    _mm256_storeu_ps(p + c, x);
    if (kDrop) {
      const __m256i cols_hash = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ctx.col_hash + c));
      const __m256i bits = _mm256_srli_epi32(Mix8(_mm256_xor_si256(row_hash, cols_hash)), 8);
      const __m256i dropped = _mm256_cmpgt_epi32(threshold, bits);
      _mm256_storeu_ps(pd + c, _mm256_andnot_ps(_mm256_castsi256_ps(dropped), _mm256_mul_ps(x, keep_scale)));
    }
  }
}

void ProbsAvx2(const float* scores, int64_t cols, const RowContext& ctx, const Dropout& drop, float lse,
               float* p, float* pd) {
  // As SoftmaxAvx2: cols is a multiple of 16; bias and mask are never read past the
  // row's last key; without either, the whole vectors below ctx.limit need no mask.
  const int64_t clean = ctx.bias == nullptr && ctx.mask == nullptr ? ctx.limit / 8 * 8 : 0;
  if (drop.on) {
    ProbsPass<true>(scores, cols, clean, ctx, drop, lse, p, pd);
  } else {
    ProbsPass<false>(scores, cols, clean, ctx, drop, lse, p, pd);
  }
}

void DscoreAvx2(const float* p, const float* pd, const float* dp, int64_t cols, float delta, float* ds) {
  const __m256 d = _mm256_set1_ps(delta);
  for (int64_t c = 0; c < cols; c += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + c), d);
    _mm256_storeu_ps(ds + c, _mm256_fmsub_ps(_mm256_loadu_ps(pd + c), _mm256_loadu_ps(dp + c), x));
  }
}

#pragma GCC pop_options

constexpr Primitives kAvx2 = {"avx2", QkAvx2, SoftmaxAvx2, PvAvx2, GemmAvx2, ProbsAvx2, DscoreAvx2};
#endif  // FASTLAYERS_X86

// ---------------------------------------------------------------------------------
// AVX-512 primitives: one whole panel of 16 floats per register, micro-tiles of up
// to kTileRows rows × 2 panels (24 accumulators of the 32 registers), lane masks in
// mask registers. The three products (Q·Kᵀ, P·V and the backward's gemms) share one
// micro-tile. Tests run them through SIMDe (isa.h) on CPUs without AVX-512.

#ifdef FASTLAYERS_X86
FASTLAYERS_AVX512_BEGIN
namespace avx512 {

constexpr int kTileRows = 12;

inline __m512 Exp16(__m512 x) { FASTLAYERS_VECTOR_EXP(512, x) }

inline __m512i Mix16(__m512i x) { FASTLAYERS_VECTOR_MIX(512, x) }

// The lanes that are dropped (the reference's uniform < rate) for columns c..c+15.
inline __mmask16 Dropped16(const RowContext& ctx, const Dropout& drop, int64_t c) {
  const __m512i cols_hash = _mm512_loadu_si512(ctx.col_hash + c);
  const __m512i bits = _mm512_srli_epi32(Mix16(_mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(ctx.row_hash)),
                                                                 cols_hash)), 8);
  // bits < 2^24 and threshold <= 2^24: a signed compare is exact.
  return _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(static_cast<int>(drop.threshold)), bits);
}

inline float Sum16(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_storeu_ps(lanes, v);
  float sum = 0.0f;
  for (float x : lanes) sum += x;
  return sum;
}

// Validity of columns c..c+15 as a lane mask; mask bytes are read only below
// ctx.limit (past it every lane is invalid anyway).
inline __mmask16 Valid16(const RowContext& ctx, int64_t c) {
  const int64_t visible = ctx.limit - c;
  __mmask16 valid = visible >= 16 ? 0xFFFF : visible <= 0 ? 0 : static_cast<__mmask16>((1u << visible) - 1u);
  if (ctx.mask == nullptr || valid == 0) return valid;
  if (ctx.mask_stride == 0) return ctx.mask[0] ? valid : 0;
  __m128i bytes;
  if (visible >= 16) {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ctx.mask + c));
  } else {
    alignas(16) bool tail[16] = {};
    std::memcpy(tail, ctx.mask + c, visible);
    bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  return valid & _mm_cmpneq_epi8_mask(bytes, _mm_setzero_si128());
}

// The bias of columns c..c+15 (ctx.bias set), never read past the row's last key.
inline __m512 Bias16(const RowContext& ctx, int64_t c) {
  if (ctx.bias_stride == 0) return _mm512_set1_ps(ctx.bias[0]);
  if (c + 16 <= ctx.keys) return _mm512_loadu_ps(ctx.bias + c);
  alignas(64) float tail[16] = {};
  for (int64_t k = c; k < ctx.keys; ++k) tail[k - c] = ctx.bias[k];
  return _mm512_loadu_ps(tail);
}

// c[i·ldc + 16j + l] (+)= Σ_k A(i, k) · b[j·panel_stride + k·ldb + l] for i < M rows,
// j < P panels, l < 16, where A(i, k) is a[i·lda + k], or a[k·lda + i] when
// Transposed (a transposed left operand, Pᵀ or dSᵀ, read in place).
template <int M, int P, bool Transposed>
inline void Tile(const float* a, int64_t lda, int64_t depth, const float* b, int64_t panel_stride, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  __m512 acc[M][P];
  _Pragma("GCC unroll 12")
  for (int i = 0; i < M; ++i) {
    _Pragma("GCC unroll 2")
    for (int j = 0; j < P; ++j) {
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + j * kPanel) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m512 w[P];
    _Pragma("GCC unroll 2")
    for (int j = 0; j < P; ++j) w[j] = _mm512_loadu_ps(b + j * panel_stride + k * ldb);
    _Pragma("GCC unroll 12")
    for (int i = 0; i < M; ++i) {
      const __m512 x = _mm512_set1_ps(Transposed ? a[k * lda + i] : a[i * lda + k]);
      _Pragma("GCC unroll 2")
      for (int j = 0; j < P; ++j) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 12")
  for (int i = 0; i < M; ++i) {
    _Pragma("GCC unroll 2")
    for (int j = 0; j < P; ++j) _mm512_storeu_ps(c + i * ldc + j * kPanel, acc[i][j]);
  }
}

// The last rows (fewer than kTileRows) of a panel pair as one Tile<rows>.
template <int P, bool Transposed, int M = kTileRows - 1>
inline void LastRows(int64_t rows, const float* a, int64_t lda, int64_t depth, const float* b, int64_t panel_stride,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if constexpr (M > 0) {
    if (rows == M) {
      Tile<M, P, Transposed>(a, lda, depth, b, panel_stride, ldb, c, ldc, accumulate);
    } else {
      LastRows<P, Transposed, M - 1>(rows, a, lda, depth, b, panel_stride, ldb, c, ldc, accumulate);
    }
  }
}

// Every row of P panels (16·P output columns).
template <int P, bool Transposed>
inline void PanelRows(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* b, int64_t panel_stride,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t row_step = Transposed ? 1 : lda;
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) {
    Tile<kTileRows, P, Transposed>(a + r * row_step, lda, depth, b, panel_stride, ldb, c + r * ldc, ldc, accumulate);
  }
  LastRows<P, Transposed>(rows - r, a + r * row_step, lda, depth, b, panel_stride, ldb, c + r * ldc, ldc, accumulate);
}

// The product over cols output columns (a multiple of 16), two panels at a time.
template <bool Transposed>
void Product(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* b, int64_t panel_stride,
             int64_t ldb, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  for (int64_t n = 0; n < cols; n += 2 * kPanel) {
    const float* panel = b + (n / kPanel) * panel_stride;
    if (n + 2 * kPanel <= cols) {
      PanelRows<2, Transposed>(a, lda, rows, depth, panel, panel_stride, ldb, c + n, ldc, accumulate);
    } else {
      PanelRows<1, Transposed>(a, lda, rows, depth, panel, panel_stride, ldb, c + n, ldc, accumulate);
    }
  }
}

void Qk(const float* q, int64_t rows, int64_t head_dim, const float* keys, int64_t ld_s, int64_t cols,
        float* scores) {
  Product<false>(q, head_dim, rows, head_dim, keys, kPanel * head_dim, kPanel, cols, scores, ld_s, false);
}

void Pv(const float* p, int64_t rows, int64_t ld_s, int64_t cols, const float* values, int64_t panel_stride,
        int64_t ld_o, float* out) {
  Product<false>(p, ld_s, rows, cols, values, panel_stride, kPanel, ld_o, out, ld_o, true);
}

void Gemm(const float* a, int64_t a_row, int64_t a_col, int64_t rows, int64_t depth, const float* b,
          int64_t panel_stride, int64_t ldb, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  if (a_row == 1 && a_col != 1) {
    Product<true>(a, a_col, rows, depth, b, panel_stride, ldb, cols, c, ldc, accumulate);
  } else {
    Product<false>(a, a_row, rows, depth, b, panel_stride, ldb, cols, c, ldc, accumulate);
  }
}

// Softmax's second pass, as ExpPass above (16 columns at a time).
template <bool kDrop>
inline float ExpPass16(float* row, int64_t cols, int64_t clean, float max, const RowContext& ctx,
                     const Dropout& drop) {
  const __m512 floor = _mm512_set1_ps(kFloor);
  const __m512 m = _mm512_set1_ps(max);
  const __m512 keep_scale = _mm512_set1_ps(drop.keep_scale);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < cols; c += kPanel) {
    const __m512 s = _mm512_loadu_ps(row + c);
    __m512 p = Exp16(_mm512_sub_ps(s, m));
    if (c >= clean) p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, floor, _CMP_NEQ_UQ), p);
    sum = _mm512_add_ps(sum, p);
    if (kDrop) p = _mm512_maskz_mul_ps(static_cast<__mmask16>(~Dropped16(ctx, drop, c)), p, keep_scale);
    _mm512_storeu_ps(row + c, p);
  }
  return Sum16(sum);
}

float Softmax(float* row, int64_t cols, const RowContext& ctx, const Dropout& drop, float* max) {
  // As SoftmaxAvx2, 16 columns at a time.
  const int64_t clean = ctx.bias == nullptr && ctx.mask == nullptr ? ctx.limit / kPanel * kPanel : 0;
  const __m512 floor = _mm512_set1_ps(kFloor);
  __m512 peak = _mm512_set1_ps(*max);
  int64_t c = 0;
  for (; c < clean; c += kPanel) peak = _mm512_max_ps(peak, _mm512_loadu_ps(row + c));
  for (; c < cols; c += kPanel) {
    __m512 s = _mm512_loadu_ps(row + c);
    if (ctx.bias != nullptr) s = _mm512_add_ps(s, Bias16(ctx, c));
    s = _mm512_mask_blend_ps(Valid16(ctx, c), floor, s);
    _mm512_storeu_ps(row + c, s);
    peak = _mm512_max_ps(peak, s);
  }
  *max = _mm512_reduce_max_ps(peak);
  return drop.on ? ExpPass16<true>(row, cols, clean, *max, ctx, drop) : ExpPass16<false>(row, cols, clean, *max, ctx, drop);
}

template <bool kDrop>
inline void ProbsPass16(const float* scores, int64_t cols, int64_t clean, const RowContext& ctx, const Dropout& drop,
                      float lse, float* p, float* pd) {
  const __m512 offset = _mm512_set1_ps(lse);
  const __m512 keep_scale = _mm512_set1_ps(drop.keep_scale);
  for (int64_t c = 0; c < cols; c += kPanel) {
    __m512 s = _mm512_loadu_ps(scores + c);
    if (ctx.bias != nullptr) s = _mm512_add_ps(s, Bias16(ctx, c));
    __m512 x = Exp16(_mm512_sub_ps(s, offset));
    if (c >= clean) x = _mm512_maskz_mov_ps(Valid16(ctx, c), x);
    _mm512_storeu_ps(p + c, x);
    if (kDrop) {
      _mm512_storeu_ps(pd + c, _mm512_maskz_mul_ps(static_cast<__mmask16>(~Dropped16(ctx, drop, c)), x, keep_scale));
    }
  }
}

void Probs(const float* scores, int64_t cols, const RowContext& ctx, const Dropout& drop, float lse, float* p,
           float* pd) {
  const int64_t clean = ctx.bias == nullptr && ctx.mask == nullptr ? ctx.limit / kPanel * kPanel : 0;
  if (drop.on) {
    ProbsPass16<true>(scores, cols, clean, ctx, drop, lse, p, pd);
  } else {
    ProbsPass16<false>(scores, cols, clean, ctx, drop, lse, p, pd);
  }
}

void Dscore(const float* p, const float* pd, const float* dp, int64_t cols, float delta, float* ds) {
  const __m512 d = _mm512_set1_ps(delta);
  for (int64_t c = 0; c < cols; c += kPanel) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(p + c), d);
    _mm512_storeu_ps(ds + c, _mm512_fmsub_ps(_mm512_loadu_ps(pd + c), _mm512_loadu_ps(dp + c), x));
  }
}

}  // namespace avx512
FASTLAYERS_AVX512_END

constexpr Primitives kAvx512 = {"avx512", avx512::Qk, avx512::Softmax, avx512::Pv,
                                avx512::Gemm, avx512::Probs, avx512::Dscore};

// ---------------------------------------------------------------------------------
// AVX512-BF16 products for bfloat16 inputs: vdpbf16ps multiplies 16 lanes of
// bfloat16 pairs and adds both products to float32 accumulators, twice the
// multiply-adds of an FMA on float32. Q·Kᵀ takes pairs of head dims (the inputs'
// own values, so its products are exact and only the float32 sums round, as in
// the float32 primitives); P·V takes pairs of keys, P rounded to bfloat16 first.
// The softmax between them stays in float32. Same micro-tile shape as above.

FASTLAYERS_AVX512_BF16_BEGIN
namespace avx512_bf16 {

using avx512::kTileRows;

inline __m512bh Pairs(__m512i v) { return (__m512bh)v; }

// c[i·ldc + 16j + l] (+)= scale · sum_k dot(a[i·lda + k], b[j·panel_stride + 16k + l])
// for i < M, j < P, k < depth pairs; with odd_tail, one more pair whose upper half
// of b (a key past the block) is not read.
template <int M, int P>
inline void PairTile(const uint32_t* a, int64_t lda, int64_t depth, bool odd_tail, const uint32_t* b,
                     int64_t panel_stride, float* c, int64_t ldc, bool accumulate, float scale) {
  __m512 acc[M][P];
  _Pragma("GCC unroll 12")
  for (int i = 0; i < M; ++i) {
    _Pragma("GCC unroll 2")
    for (int j = 0; j < P; ++j) {
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + j * kPanel) : _mm512_setzero_ps();
    }
  }
  const int64_t steps = depth + (odd_tail ? 1 : 0);
  for (int64_t k = 0; k < steps; ++k) {
    __m512i w[P];
    _Pragma("GCC unroll 2")
    for (int j = 0; j < P; ++j) w[j] = _mm512_loadu_si512(b + j * panel_stride + k * kPanel);
    if (k == depth) {
      // A zero upper half, not a zero p: 0 · NaN would still be NaN.
      _Pragma("GCC unroll 2")
      for (int j = 0; j < P; ++j) w[j] = _mm512_and_si512(w[j], _mm512_set1_epi32(0xFFFF));
    }
    _Pragma("GCC unroll 12")
    for (int i = 0; i < M; ++i) {
      const __m512bh x = Pairs(_mm512_set1_epi32(static_cast<int>(a[i * lda + k])));
      _Pragma("GCC unroll 2")
      for (int j = 0; j < P; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, Pairs(w[j]));
    }
  }
  const __m512 factor = _mm512_set1_ps(scale);
  _Pragma("GCC unroll 12")
  for (int i = 0; i < M; ++i) {
    _Pragma("GCC unroll 2")
    for (int j = 0; j < P; ++j) _mm512_storeu_ps(c + i * ldc + j * kPanel, _mm512_mul_ps(acc[i][j], factor));
  }
}

template <int P, int M = kTileRows - 1>
inline void LastPairRows(int64_t rows, const uint32_t* a, int64_t lda, int64_t depth, bool odd_tail,
                         const uint32_t* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate,
                         float scale) {
  if constexpr (M > 0) {
    if (rows == M) {
      PairTile<M, P>(a, lda, depth, odd_tail, b, panel_stride, c, ldc, accumulate, scale);
    } else {
      LastPairRows<P, M - 1>(rows, a, lda, depth, odd_tail, b, panel_stride, c, ldc, accumulate, scale);
    }
  }
}

// The product over cols output columns (a multiple of 16), two panels at a time.
void PairProduct(const uint32_t* a, int64_t lda, int64_t rows, int64_t depth, bool odd_tail, const uint32_t* b,
                 int64_t panel_stride, int64_t cols, float* c, int64_t ldc, bool accumulate, float scale) {
  for (int64_t n = 0; n < cols; n += 2 * kPanel) {
    const uint32_t* panel = b + (n / kPanel) * panel_stride;
    const bool pair = n + 2 * kPanel <= cols;
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows) {
      if (pair) {
        PairTile<kTileRows, 2>(a + r * lda, lda, depth, odd_tail, panel, panel_stride, c + r * ldc + n, ldc,
                               accumulate, scale);
      } else {
        PairTile<kTileRows, 1>(a + r * lda, lda, depth, odd_tail, panel, panel_stride, c + r * ldc + n, ldc,
                               accumulate, scale);
      }
    }
    if (pair) {
      LastPairRows<2>(rows - r, a + r * lda, lda, depth, odd_tail, panel, panel_stride, c + r * ldc + n, ldc,
                      accumulate, scale);
    } else {
      LastPairRows<1>(rows - r, a + r * lda, lda, depth, odd_tail, panel, panel_stride, c + r * ldc + n, ldc,
                      accumulate, scale);
    }
  }
}

void QkPairs(const uint32_t* q, int64_t rows, int64_t pairs, const uint32_t* keys, int64_t ld_s, int64_t cols,
             float scale, float* scores) {
  PairProduct(q, pairs, rows, pairs, false, keys, kPanel * pairs, cols, scores, ld_s, false, scale);
}

void PvPairs(const uint32_t* p, int64_t rows, int64_t ld_p, int64_t keys, const uint32_t* values,
             int64_t panel_stride, int64_t ld_o, float* out) {
  PairProduct(p, ld_p, rows, keys / 2, keys % 2 != 0, values, panel_stride, ld_o, out, ld_o, true, 1.0f);
}

// 16 floats' bits plus what rounds them to bfloat16 in their upper halves (nearest
// even; probabilities are finite or NaN, and NaN stays NaN).
inline __m512i RoundedBits(const float* x) {
  const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(x));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}

// Rounds floats to bfloat16 and keeps their upper halves in order, 32 at a time.
void ToPairs(const float* p, int64_t cols, uint32_t* pairs) {
  // Word w of the result is the upper half of float w: word 2w + 1 of the two inputs.
  alignas(64) static constexpr uint16_t kUpper[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                      23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                      45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i upper = _mm512_loadu_si512(kUpper);
  int64_t c = 0;
  for (; c + 2 * kPanel <= cols; c += 2 * kPanel) {
    _mm512_storeu_si512(pairs + c / 2, _mm512_permutex2var_epi16(RoundedBits(p + c), upper, RoundedBits(p + c + kPanel)));
  }
  for (; c < cols; c += 2) {
    uint32_t halves[2];
    for (int h = 0; h < 2; ++h) {
      uint32_t bits;
      std::memcpy(&bits, p + c + h, sizeof(bits));
      halves[h] = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    }
    pairs[c / 2] = halves[0] | (halves[1] << 16);
  }
}

}  // namespace avx512_bf16
FASTLAYERS_AVX512_BF16_END

// ---------------------------------------------------------------------------------
// AMX-BF16 products for bfloat16 inputs: the same pairs as above, in tiles of 16
// rows of 64 bytes (16 pairs, or 16 floats), multiplied by the tile unit. The pairs
// layouts are already what its operands want: keys [cols/16][pairs][16] and values
// [S/2][16] are right-hand tiles as they lie, q and p rows left-hand ones. Every
// size comes in whole tiles (pair_quantum 16, the op pads with zeros); the last
// step of P·V, whose pairs run past the block's keys, multiplies a copy of the
// values with those keys zeroed (a zero probability times a NaN would still be NaN).
// Tiles: 0 and 1 accumulate two panels of 16 columns, 2 holds the left operand,
// 4 and 5 the right ones.

FASTLAYERS_AMX_BEGIN
namespace amx {

constexpr int64_t kTile = 16;  // rows of a tile, and pairs (or floats) of a row

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 all 16 rows of 64 bytes.
inline const TileConfig& Config() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = kTile;
    return c;
  }();
  return config;
}

// The tile instructions read memory the compiler does not know they read: what was
// written before them must be written by then.
inline void WrittenBefore() { asm volatile("" ::: "memory"); }

void QkPairs(const uint32_t* q, int64_t rows, int64_t pairs, const uint32_t* keys, int64_t ld_s, int64_t cols,
             float scale, float* scores) {
  const int64_t stride_q = pairs * 4, stride_k = kPanel * 4, stride_s = ld_s * 4;
  WrittenBefore();
  _tile_loadconfig(&Config());
  for (int64_t r = 0; r < rows; r += kTile) {
    const uint32_t* a = q + r * pairs;
    float* c = scores + r * ld_s;
    int64_t n = 0;
    for (; n + 2 * kPanel <= cols; n += 2 * kPanel) {
      const uint32_t* b = keys + n * pairs;  // panel n / 16, then the next
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = 0; k < pairs; k += kTile) {
        _tile_loadd(2, a + k, stride_q);
        _tile_loadd(4, b + k * kPanel, stride_k);
        _tile_loadd(5, b + kPanel * pairs + k * kPanel, stride_k);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 2, 5);
      }
      _tile_stored(0, c + n, stride_s);
      _tile_stored(1, c + n + kPanel, stride_s);
    }
    if (n < cols) {
      const uint32_t* b = keys + n * pairs;
      _tile_zero(0);
      for (int64_t k = 0; k < pairs; k += kTile) {
        _tile_loadd(2, a + k, stride_q);
        _tile_loadd(4, b + k * kPanel, stride_k);
        _tile_dpbf16ps(0, 2, 4);
      }
      _tile_stored(0, c + n, stride_s);
    }
  }
  _tile_release();
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += kPanel) {
      _mm512_storeu_ps(scores + r * ld_s + c, _mm512_mul_ps(_mm512_loadu_ps(scores + r * ld_s + c), factor));
    }
  }
}

// Pairs step·16 .. step·16 + 15 of a values panel, with every key from `keys` on zero.
inline void LastValues(const uint32_t* panel, int64_t step, int64_t keys, uint32_t* tile) {
  for (int64_t i = 0; i < kTile; ++i) {
    const int64_t pair = step * kTile + i;
    const uint32_t keep = 2 * pair + 1 < keys ? 0xFFFFFFFFu : (2 * pair < keys ? 0xFFFFu : 0u);
    for (int64_t l = 0; l < kPanel; ++l) tile[i * kPanel + l] = keep != 0 ? panel[pair * kPanel + l] & keep : 0u;
  }
}

void PvPairs(const uint32_t* p, int64_t rows, int64_t ld_p, int64_t keys, const uint32_t* values,
             int64_t panel_stride, int64_t ld_o, float* out) {
  const int64_t steps = (keys + 2 * kTile - 1) / (2 * kTile);  // 16 pairs of keys a step
  const int64_t whole = keys / (2 * kTile);                   // steps whose keys all exist
  const int64_t stride_p = ld_p * 4, stride_v = kPanel * 4, stride_o = ld_o * 4;
  alignas(64) uint32_t last[2][kTile * kPanel];
  for (int64_t d = 0; d < ld_o; d += 2 * kPanel) {
    const bool two = d + 2 * kPanel <= ld_o;
    const uint32_t* v0 = values + (d / kPanel) * panel_stride;
    const uint32_t* v1 = v0 + panel_stride;
    if (whole < steps) {
      LastValues(v0, whole, keys, last[0]);
      if (two) LastValues(v1, whole, keys, last[1]);
    }
    WrittenBefore();
    _tile_loadconfig(&Config());
    for (int64_t r = 0; r < rows; r += kTile) {
      const uint32_t* a = p + r * ld_p;
      float* c = out + r * ld_o + d;
      _tile_loadd(0, c, stride_o);
      if (two) _tile_loadd(1, c + kPanel, stride_o);
      for (int64_t k = 0; k < steps; ++k) {
        _tile_loadd(2, a + k * kTile, stride_p);
        if (k < whole) {
          _tile_loadd(4, v0 + k * kTile * kPanel, stride_v);
          if (two) _tile_loadd(5, v1 + k * kTile * kPanel, stride_v);
        } else {
          _tile_loadd(4, last[0], stride_v);
          if (two) _tile_loadd(5, last[1], stride_v);
        }
        _tile_dpbf16ps(0, 2, 4);
        if (two) _tile_dpbf16ps(1, 2, 5);
      }
      _tile_stored(0, c, stride_o);
      if (two) _tile_stored(1, c + kPanel, stride_o);
    }
    _tile_release();
  }
}

}  // namespace amx
FASTLAYERS_AMX_END

constexpr Primitives kAvx512Bf16 = {"avx512bf16", avx512::Qk, avx512::Softmax, avx512::Pv,
                                    avx512::Gemm, avx512::Probs, avx512::Dscore,
                                    avx512_bf16::QkPairs, avx512_bf16::ToPairs, avx512_bf16::PvPairs};
constexpr Primitives kAmx = {"amx", avx512::Qk, avx512::Softmax, avx512::Pv,
                             avx512::Gemm, avx512::Probs, avx512::Dscore,
                             amx::QkPairs, avx512_bf16::ToPairs, amx::PvPairs, amx::kTile};
constexpr const Primitives* kTables[] = {&kAmx, &kAvx512Bf16, &kAvx512, &kAvx2, &kPortable};
#else
constexpr const Primitives* kTables[] = {&kPortable};
#endif  // FASTLAYERS_X86

// ---------------------------------------------------------------------------------
// The op.

REGISTER_OP("FastlayersAttentionForward")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Input("bias: float")
    .Input("mask: bool")
    .Input("seed: uint32")
    .Output("output: T")
    .Output("logsumexp: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("scale: float")
    .Attr("is_causal: bool = false")
    .Attr("dropout_rate: float = 0.0")
    .Attr("dropout_scale: float = 1.0")
    .Attr("has_bias: bool = false")
    .Attr("has_mask: bool = false")
    .Attr("block_q: int = 64")
    .Attr("block_k: int = 512")
    .Attr("isa: {'best', 'amx', 'avx512bf16', 'avx512', 'avx2', 'portable'} = 'best'")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle q, v;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &v));
      c->set_output(0, c->MakeShape({c->Dim(q, 0), c->Dim(q, 1), c->Dim(q, 2), c->Dim(v, 3)}));
      c->set_output(1, c->MakeShape({c->Dim(q, 0), c->Dim(q, 2), c->Dim(q, 1)}));
      return absl::OkStatus();
    });

REGISTER_OP("FastlayersNativeIsa")
    .Output("isa: string")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

REGISTER_KERNEL_BUILDER(Name("FastlayersNativeIsa").Device(tensorflow::DEVICE_CPU), BestIsaOp<kTables>);

// A rank-4 [b, n, t, s] bias or mask, each axis 1 (broadcast) or full.
struct Broadcast4 {
  int64_t dims[4] = {1, 1, 1, 1};
  // Element offset of (b, n, t) and the stride along s.
  int64_t Row(int64_t b, int64_t n, int64_t t) const {
    const int64_t bb = dims[0] == 1 ? 0 : b, nn = dims[1] == 1 ? 0 : n, tt = dims[2] == 1 ? 0 : t;
    return ((bb * dims[1] + nn) * dims[2] + tt) * dims[3];
  }
  int64_t Stride() const { return dims[3] == 1 ? 0 : 1; }
};

// Where each query row's bias and mask rows lie, and its dropout hashes: the RowContext
// of a (row, key block) for the fused passes, built the same in the forward and backward.
struct RowSource {
  const float* bias;         // nullptr without a bias
  Broadcast4 bias_layout;
  const bool* mask;          // nullptr without a mask
  Broadcast4 mask_layout;
  bool causal;
  const uint32_t* col_hash;  // the columns' hashes; nullptr without dropout

  // Row t of batch b, head n, in the key block of `keys` keys from c0.
  RowContext Row(int64_t b, int64_t n, int64_t t, int64_t c0, int64_t keys, uint32_t row_hash) const {
    RowContext row;
    row.bias = bias != nullptr ? bias + bias_layout.Row(b, n, t) + c0 * bias_layout.Stride() : nullptr;
    row.bias_stride = bias_layout.Stride();
    row.mask = mask != nullptr ? mask + mask_layout.Row(b, n, t) + c0 * mask_layout.Stride() : nullptr;
    row.mask_stride = mask_layout.Stride();
    row.keys = keys;
    row.limit = causal ? std::min(keys, t - c0 + 1) : keys;
    row.row_hash = col_hash != nullptr ? row_hash : 0;
    row.col_hash = col_hash != nullptr ? col_hash + c0 : nullptr;
    return row;
  }
};

// The op's dropout from its attributes and seed words (two uint32 when rate > 0).
absl::Status MakeDropout(float rate, float keep_scale, const Tensor& seed, Dropout* drop) {
  if (rate <= 0.0f) return absl::OkStatus();
  if (seed.NumElements() != 2) {
    return errors::InvalidArgument("seed must hold two uint32 words when dropout_rate > 0. Received: seed.shape=",
                                   seed.shape().DebugString());
  }
  const auto words = seed.flat<uint32_t>();
  drop->on = true;
  drop->seed0_mixed = Mix(words(0));
  drop->seed1 = words(1);
  drop->threshold = static_cast<uint32_t>(std::ceil(static_cast<double>(rate) * 16777216.0));
  drop->keep_scale = keep_scale;
  return absl::OkStatus();
}

int64_t RoundUp(int64_t x, int64_t quantum) { return (x + quantum - 1) / quantum * quantum; }

absl::Status CheckBroadcast(const char* name, const Tensor& x, bool present, const int64_t target[4],
                            Broadcast4* layout) {
  if (!present) return absl::OkStatus();
  bool ok = x.dims() == 4;
  for (int i = 0; ok && i < 4; ++i) ok = x.dim_size(i) == 1 || x.dim_size(i) == target[i];
  if (!ok) {
    return errors::InvalidArgument(name, " must have rank 4 and broadcast to [B, N, T, S] = [", target[0], ", ",
                                   target[1], ", ", target[2], ", ", target[3], "]. Received: ", name,
                                   ".shape=", x.shape().DebugString());
  }
  for (int i = 0; i < 4; ++i) layout->dims[i] = x.dim_size(i);
  return absl::OkStatus();
}

// The attributes the forward and backward ops share, read and checked once, and
// the shape check of their operands.
class AttentionOpBase : public OpKernel {
 protected:
  // The sizes of query [B, T, N, H], key [B, S, K, H] and value [B, S, K, D];
  // false, with the context's status set, when their ranks or sizes disagree.
  static bool CheckedDims(OpKernelContext* context, const Tensor& query, const Tensor& key,
                          const Tensor& value, int64_t* B, int64_t* T, int64_t* N, int64_t* H,
                          int64_t* S, int64_t* K, int64_t* D) {
    const auto shapes = [&] {
      return errors::InvalidArgument(
          "query [B, T, N, H], key [B, S, K, H] and value [B, S, K, D] must agree (rank 4, "
          "K dividing N). Received: query.shape=",
          query.shape().DebugString(), ", key.shape=", key.shape().DebugString(),
          ", value.shape=", value.shape().DebugString());
    };
    if (query.dims() != 4 || key.dims() != 4 || value.dims() != 4) {
      context->CtxFailure(__FILE__, __LINE__, shapes());
      return false;
    }
    *B = query.dim_size(0), *T = query.dim_size(1), *N = query.dim_size(2), *H = query.dim_size(3);
    *S = key.dim_size(1), *K = key.dim_size(2), *D = value.dim_size(3);
    if (key.dim_size(0) != *B || value.dim_size(0) != *B || value.dim_size(1) != *S ||
        value.dim_size(2) != *K || key.dim_size(3) != *H || *K <= 0 || *N % *K != 0) {
      context->CtxFailure(__FILE__, __LINE__, shapes());
      return false;
    }
    return true;
  }

  explicit AttentionOpBase(OpKernelConstruction* context) : OpKernel(context) {
    std::string isa;
    OP_REQUIRES_OK(context, context->GetAttr("isa", &isa));
    primitives_ = ChooseIsa(kTables, isa);
    OP_REQUIRES(context, primitives_ != nullptr, errors::InvalidArgument(IsaError(kTables, isa)));
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(context, context->GetAttr("is_causal", &is_causal_));
    OP_REQUIRES_OK(context, context->GetAttr("dropout_rate", &dropout_rate_));
    OP_REQUIRES_OK(context, context->GetAttr("dropout_scale", &dropout_scale_));
    OP_REQUIRES_OK(context, context->GetAttr("has_bias", &has_bias_));
    OP_REQUIRES_OK(context, context->GetAttr("has_mask", &has_mask_));
    OP_REQUIRES_OK(context, context->GetAttr("block_q", &block_q_));
    OP_REQUIRES_OK(context, context->GetAttr("block_k", &block_k_));
    OP_REQUIRES(context, dropout_rate_ >= 0.0f && dropout_rate_ < 1.0f,
                errors::InvalidArgument("dropout_rate must be in [0, 1). Received: dropout_rate=",
                                        dropout_rate_));
    OP_REQUIRES(context, block_q_ > 0 && block_k_ > 0,
                errors::InvalidArgument("block_q and block_k must be positive. Received: block_q=",
                                        block_q_, ", block_k=", block_k_));
  }

  const Primitives* primitives_;
  float scale_;
  bool is_causal_;
  float dropout_rate_;
  float dropout_scale_;
  bool has_bias_;
  bool has_mask_;
  int64_t block_q_;
  int64_t block_k_;
};

// The forward's key and value panels, kept between calls: tens of MB of fresh pages
// on every call cost a page fault per 4 KiB (about 3% of a B=4, T=S=2048 call). One
// buffer for the process, up to kKeptPanelBytes; a call that finds it in use (another
// attention op running at the same time) or needs more allocates its own.
constexpr int64_t kKeptPanelBytes = int64_t{256} << 20;

struct KeptPanels {
  std::mutex mutex;
  std::vector<float> data;
};

KeptPanels& SharedPanels() {
  static KeptPanels* panels = new KeptPanels;  // never destroyed: ops may run at exit
  return *panels;
}

// A bfloat16's bits (the pairs' halves); the other types never take that path.
template <typename Scalar>
uint32_t Bits(const Scalar& x) {
  if constexpr (std::is_same<Scalar, Eigen::bfloat16>::value) {
    uint16_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bits;
  } else {
    return 0;
  }
}

template <typename Scalar>
class AttentionForwardOp : public AttentionOpBase {
 public:
  explicit AttentionForwardOp(OpKernelConstruction* context) : AttentionOpBase(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& query = context->input(0);
    const Tensor& key = context->input(1);
    const Tensor& value = context->input(2);
    const Tensor& bias = context->input(3);
    const Tensor& mask = context->input(4);
    const Tensor& seed = context->input(5);
    int64_t B, T, N, H, S, K, D;
    if (!CheckedDims(context, query, key, value, &B, &T, &N, &H, &S, &K, &D)) return;
    const int64_t target[4] = {B, N, T, S};
    Broadcast4 bias_layout, mask_layout;
    OP_REQUIRES_OK(context, CheckBroadcast("bias", bias, has_bias_, target, &bias_layout));
    OP_REQUIRES_OK(context, CheckBroadcast("mask", mask, has_mask_, target, &mask_layout));
    Dropout drop;
    OP_REQUIRES_OK(context, MakeDropout(dropout_rate_, dropout_scale_, seed, &drop));

    Tensor* output = nullptr;
    Tensor* logsumexp = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({B, T, N, D}), &output));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({B, N, T}), &logsumexp));
    if (B == 0 || T == 0 || N == 0) return;

    const int64_t G = N / K;
    // Key blocks: at most block_k keys, in whole column quanta.
    const int64_t block_k = RoundUp(std::max<int64_t>(1, std::min<int64_t>(block_k_, S)), kPanel);
    const int64_t num_k = (S + block_k - 1) / block_k;
    const int64_t s_pad = num_k * block_k;
    const int64_t d_pad = RoundUp(std::max<int64_t>(D, 1), kPanel);
    const int64_t block_q = std::min<int64_t>(block_q_, T);
    const int64_t num_q = (T + block_q - 1) / block_q;

    const Scalar* q_data = query.flat<Scalar>().data();
    const Scalar* k_data = key.flat<Scalar>().data();
    const Scalar* v_data = value.flat<Scalar>().data();
    const float* bias_data = has_bias_ ? bias.flat<float>().data() : nullptr;
    const bool* mask_data = has_mask_ ? mask.flat<bool>().data() : nullptr;

    // Keys no score can see (the mask hides them from every head and row): their
    // values are zeroed while packing, so NaN there reaches no product.
    std::vector<uint8_t> key_seen;
    if (has_mask_) {
      key_seen.assign(mask_layout.dims[0] * S, 0);
      for (int64_t b = 0; b < mask_layout.dims[0]; ++b)
        for (int64_t n = 0; n < mask_layout.dims[1]; ++n)
          for (int64_t t = 0; t < mask_layout.dims[2]; ++t) {
            const bool* m = mask_data + mask_layout.Row(b, n, t);
            for (int64_t s = 0; s < S; ++s) key_seen[b * S + s] |= m[s * mask_layout.Stride()];
          }
    }

    const Primitives& prim = *primitives_;
    // bfloat16 inputs on a CPU that multiplies bfloat16 pairs: the panels hold pairs
    // (of head dims for keys, of keys for values) in the same buffer.
    const bool pairs = std::is_same<Scalar, Eigen::bfloat16>::value && prim.qk_pairs != nullptr;
    const int64_t quantum = pairs ? std::max<int64_t>(1, prim.pair_quantum) : 1;
    const int64_t h_pairs = RoundUp((H + 1) / 2, quantum);
    const int64_t rows_pad = RoundUp(block_q, quantum);  // rows of the tiles
    const int64_t p_stride = RoundUp(block_k / 2, quantum);  // pairs of a p row
    const int64_t key_stride = pairs ? s_pad * h_pairs : s_pad * H;  // one head's key panels, in words
    const int64_t key_floats = B * K * key_stride, value_floats = B * K * s_pad * d_pad;
    Tensor packed, column_hashes;
    float* kt_all = nullptr;
    std::unique_lock<std::mutex> kept(SharedPanels().mutex, std::try_to_lock);
    if (kept.owns_lock() && (key_floats + value_floats) * 4 <= kKeptPanelBytes) {
      std::vector<float>& data = SharedPanels().data;
      if (static_cast<int64_t>(data.size()) < key_floats + value_floats) data.resize(key_floats + value_floats);
      kt_all = data.data();
    } else {
      if (kept.owns_lock()) kept.unlock();
      OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_FLOAT, TensorShape({key_floats + value_floats}),
                                                     &packed));
      kt_all = packed.flat<float>().data();
    }
    float* v_all = kt_all + key_floats;
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_UINT32, TensorShape({drop.on ? s_pad : 0}),
                                                   &column_hashes));
    uint32_t* col_hash = column_hashes.flat<uint32_t>().data();
    for (int64_t s = 0; drop.on && s < s_pad; ++s) col_hash[s] = Mix(static_cast<uint32_t>(s) ^ drop.seed1);

    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // Packing: per (b, k) head, keys as [s_pad/16][H][16] and values as
    // [d_pad/16][s_pad][16] panels (kPanel), both in float32; or, with pairs, keys as
    // [s_pad/16][h_pairs][16] and values as [d_pad/16][s_pad/2][16] pairs.
    auto pack = [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk) {
        const int64_t b = bk / K, k = bk % K;
        float* kt = kt_all + bk * key_stride;
        float* v = v_all + bk * s_pad * d_pad;
        const uint8_t* seen = has_mask_ ? key_seen.data() + (mask_layout.dims[0] == 1 ? 0 : b) * S : nullptr;
        for (int64_t s = 0; s < s_pad; ++s) {
          const bool keep = s < S && (seen == nullptr || seen[s]);
          const Scalar* k_src = k_data + ((b * S + s) * K + k) * H;
          const Scalar* v_src = v_data + ((b * S + s) * K + k) * D;
          if (pairs) {
            uint32_t* k_lane = reinterpret_cast<uint32_t*>(kt) + (s / kPanel) * h_pairs * kPanel + (s % kPanel);
            for (int64_t i = 0; i < h_pairs; ++i) {
              const uint32_t low = keep && 2 * i < H ? Bits(k_src[2 * i]) : 0;
              const uint32_t high = keep && 2 * i + 1 < H ? Bits(k_src[2 * i + 1]) : 0;
              k_lane[i * kPanel] = low | (high << 16);
            }
            uint16_t* v_half = reinterpret_cast<uint16_t*>(v) + ((s / 2) * kPanel) * 2 + s % 2;
            for (int64_t d = 0; d < d_pad; ++d) {
              v_half[((d / kPanel) * (s_pad / 2) * kPanel + d % kPanel) * 2] = keep && d < D ? Bits(v_src[d]) : 0;
            }
            continue;
          }
          float* k_lane = kt + (s / kPanel) * H * kPanel + (s % kPanel);
          float* v_lane = v + s * kPanel;
          for (int64_t h = 0; h < H; ++h) k_lane[h * kPanel] = keep ? static_cast<float>(k_src[h]) : 0.0f;
          for (int64_t d = 0; d < d_pad; ++d) {
            v_lane[(d / kPanel) * s_pad * kPanel + d % kPanel] = keep && d < D ? static_cast<float>(v_src[d]) : 0.0f;
          }
        }
      }
    };
    tensorflow::Shard(workers->num_threads, workers->workers, B * K, s_pad * (H + d_pad) * 4, pack);

    Scalar* out_data = output->flat<Scalar>().data();
    float* lse_data = logsumexp->flat<float>().data();
    const float scale = scale_;
    const bool causal = is_causal_;
    const RowSource rows_of{bias_data, bias_layout, mask_data, mask_layout, causal, drop.on ? col_hash : nullptr};

    // One work item: (b, k, g, query block), numbered so that neighbours share a
    // key/value head.
    auto attend = [&](int64_t begin, int64_t end) {
      std::vector<float> q_tile(block_q * std::max<int64_t>(H, 1));
      // Zero-initialized: the pairs products may read the padding.
      std::vector<uint32_t> q_pairs(pairs ? rows_pad * h_pairs : 0), p_pairs(pairs ? rows_pad * p_stride : 0);
      std::vector<float> scores(rows_pad * block_k);
      std::vector<float> acc(rows_pad * d_pad);
      std::vector<float> row_max(block_q), row_sum(block_q);
      std::vector<uint32_t> row_hash(block_q);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t qi = item % num_q;
        const int64_t n = (item / num_q) % N;  // n = k·G + g
        const int64_t b = item / (num_q * N);
        const int64_t k = n / G;
        const int64_t t0 = qi * block_q;
        const int64_t rows = std::min(block_q, T - t0);
        for (int64_t r = 0; r < rows; ++r) {
          const Scalar* src = q_data + ((b * T + t0 + r) * N + n) * H;
          if (pairs) {
            for (int64_t i = 0; i < h_pairs; ++i) {
              const uint32_t low = 2 * i < H ? Bits(src[2 * i]) : 0;
              const uint32_t high = 2 * i + 1 < H ? Bits(src[2 * i + 1]) : 0;
              q_pairs[r * h_pairs + i] = low | (high << 16);
            }
          } else {
            for (int64_t h = 0; h < H; ++h) q_tile[r * H + h] = static_cast<float>(src[h]) * scale;
          }
          if (drop.on) {
            const uint32_t position = static_cast<uint32_t>((b * N + n) * T + t0 + r);
            row_hash[r] = Mix(position ^ drop.seed0_mixed);
          }
        }
        std::fill(acc.begin(), acc.begin() + rows * d_pad, 0.0f);
        std::fill(row_max.begin(), row_max.begin() + rows, kFloor);
        std::fill(row_sum.begin(), row_sum.begin() + rows, 0.0f);
        const float* kt_head = kt_all + (b * K + k) * key_stride;
        const float* v_head = v_all + (b * K + k) * s_pad * d_pad;
        // Causal: the block's last row sees keys up to t0 + rows - 1.
        const int64_t key_end = causal ? std::min(S, t0 + rows) : S;
        for (int64_t j = 0; j * block_k < key_end; ++j) {
          const int64_t c0 = j * block_k;
          const int64_t keys = std::min(block_k, key_end - c0);
          const int64_t cols = RoundUp(keys, kPanel);
          if (pairs) {
            prim.qk_pairs(q_pairs.data(), rows, h_pairs, reinterpret_cast<const uint32_t*>(kt_head) + c0 * h_pairs,
                          block_k, cols, scale, scores.data());
          } else {
            prim.qk(q_tile.data(), rows, H, kt_head + c0 * H, block_k, cols, scores.data());
          }
          for (int64_t r = 0; r < rows; ++r) {
            const RowContext row = rows_of.Row(b, n, t0 + r, c0, keys, row_hash[r]);
            float peak = row_max[r];
            const float sum = prim.softmax(scores.data() + r * block_k, cols, row, drop, &peak);
            const float correction = std::exp(row_max[r] - peak);
            row_max[r] = peak;
            row_sum[r] = row_sum[r] * correction + sum;
            if (correction != 1.0f) {
              float* o = acc.data() + r * d_pad;
              for (int64_t d = 0; d < d_pad; ++d) o[d] *= correction;
            }
            if (pairs) {
              uint32_t* p_row = p_pairs.data() + r * p_stride;
              prim.to_pairs(scores.data() + r * block_k, cols, p_row);
              std::fill(p_row + cols / 2, p_row + RoundUp(cols / 2, quantum), 0u);
            }
          }
          if (pairs) {
            prim.pv_pairs(p_pairs.data(), rows, p_stride, keys,
                          reinterpret_cast<const uint32_t*>(v_head) + (c0 / 2) * kPanel, (s_pad / 2) * kPanel, d_pad,
                          acc.data());
          } else {
            prim.pv(scores.data(), rows, block_k, keys, v_head + c0 * kPanel, s_pad * kPanel, d_pad, acc.data());
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          // A row that saw no key has sum 0 and a zero accumulator: dividing by 1 keeps it 0.
          const float total = row_sum[r] > 0.0f ? row_sum[r] : 1.0f;
          const float inverse = 1.0f / total;
          Scalar* dst = out_data + ((b * T + t0 + r) * N + n) * D;
          const float* o = acc.data() + r * d_pad;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Scalar>(o[d] * inverse);
          lse_data[(b * N + n) * T + t0 + r] = row_max[r] + std::log(total);
        }
      }
    };
    // ParallelFor cuts the items into more blocks than threads and hands them out as
    // threads free up: causal query blocks cost more the later they come.
    const int64_t cost = block_q * std::max<int64_t>(S, 1) * (H + D) * 2;
    workers->workers->ParallelFor(B * N * num_q, cost, attend);
  }

};

#define FASTLAYERS_REGISTER(type)                                                                     \
  REGISTER_KERNEL_BUILDER(Name("FastlayersAttentionForward").Device(tensorflow::DEVICE_CPU).TypeConstraint<type>("T"), \
                          AttentionForwardOp<type>)
FASTLAYERS_REGISTER(float);
FASTLAYERS_REGISTER(Eigen::half);
FASTLAYERS_REGISTER(Eigen::bfloat16);
#undef FASTLAYERS_REGISTER

// ---------------------------------------------------------------------------------
// The backward op: dq, dk, dv (and d_bias) from the forward's output and logsumexp.
//
// Per (batch, key/value head) item, the G query heads of its group one after the
// other, query blocks outside and key blocks inside (the loop order of PyTorch's
// CPU flash attention backward). For query block i and key block j, with q scaled:
//   S = Q_i·K_jᵀ, P = exp(S + bias - lse) where valid (else 0), Pd = P·dropout,
//   dV_j += Pdᵀ·dO_i, dP = dO_i·V_jᵀ, dS = Pd·dP - P·Delta (Delta = rowsum(dO·O)),
//   dQ_i += dS·K_j, dK_j += dSᵀ·Q_i,
// each product one `gemm` on float32 tiles; no [T, S] buffer exists. dQ_i lives in a
// small accumulator written once per query block; dK and dV in the item's float32
// accumulators of its S rows. An item owns its dk/dv rows, so no two threads write
// the same one, and its sums run in one order whatever the thread count.
//
// Fewer items than kMinUnits (a small batch with few key/value heads) would leave
// threads idle: without a bias, each item's key blocks are then cut into chunks of
// their own work unit, each owning its keys' dk/dv rows and adding its share of dq
// into a float32 partial of its own, summed in chunk order at the end. The chunk
// count follows the shapes only, never the thread count.
//
// A bias gradient sums dS over the bias's broadcast axes, so items whose batch or
// head the bias broadcasts over add into the same elements. They go to different
// slots (float32 copies of d_bias, summed in slot order at the end) or, past
// `bias_slot_bytes` of slots, run one after another in one work unit; either way
// the order of every sum is fixed, and threads change no bit of any gradient.

constexpr int64_t kMinUnits = 8;

REGISTER_OP("FastlayersAttentionBackward")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Input("bias: float")
    .Input("mask: bool")
    .Input("seed: uint32")
    .Input("output: T")
    .Input("logsumexp: float")
    .Input("d_output: T")
    .Output("d_query: T")
    .Output("d_key: T")
    .Output("d_value: T")
    .Output("d_bias: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("scale: float")
    .Attr("is_causal: bool = false")
    .Attr("dropout_rate: float = 0.0")
    .Attr("dropout_scale: float = 1.0")
    .Attr("has_bias: bool = false")
    .Attr("has_mask: bool = false")
    .Attr("block_q: int = 64")
    .Attr("block_k: int = 128")
    .Attr("bias_slot_bytes: int = 134217728")
    .Attr("isa: {'best', 'amx', 'avx512bf16', 'avx512', 'avx2', 'portable'} = 'best'")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < 4; ++i) c->set_output(i, c->input(i));
      return absl::OkStatus();
    });

template <typename Scalar>
class AttentionBackwardOp : public AttentionOpBase {
 public:
  explicit AttentionBackwardOp(OpKernelConstruction* context) : AttentionOpBase(context) {
    OP_REQUIRES_OK(context, context->GetAttr("bias_slot_bytes", &bias_slot_bytes_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& query = context->input(0);
    const Tensor& key = context->input(1);
    const Tensor& value = context->input(2);
    const Tensor& bias = context->input(3);
    const Tensor& mask = context->input(4);
    const Tensor& seed = context->input(5);
    const Tensor& output = context->input(6);
    const Tensor& logsumexp = context->input(7);
    const Tensor& d_output = context->input(8);
    int64_t B, T, N, H, S, K, D;
    if (!CheckedDims(context, query, key, value, &B, &T, &N, &H, &S, &K, &D)) return;
    const TensorShape out_shape({B, T, N, D});
    OP_REQUIRES(context,
                output.shape() == out_shape && d_output.shape() == out_shape &&
                    logsumexp.shape() == TensorShape({B, N, T}),
                errors::InvalidArgument("output and d_output must have shape [B, T, N, D] = ", out_shape.DebugString(),
                                        " and logsumexp [B, N, T] = [", B, ",", N, ",", T,
                                        "]. Received: output.shape=", output.shape().DebugString(),
                                        ", d_output.shape=", d_output.shape().DebugString(),
                                        ", logsumexp.shape=", logsumexp.shape().DebugString()));
    const int64_t target[4] = {B, N, T, S};
    Broadcast4 bias_layout, mask_layout;
    OP_REQUIRES_OK(context, CheckBroadcast("bias", bias, has_bias_, target, &bias_layout));
    OP_REQUIRES_OK(context, CheckBroadcast("mask", mask, has_mask_, target, &mask_layout));
    Dropout drop;
    OP_REQUIRES_OK(context, MakeDropout(dropout_rate_, dropout_scale_, seed, &drop));

    Tensor *d_query = nullptr, *d_key = nullptr, *d_value = nullptr, *d_bias = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, query.shape(), &d_query));
    OP_REQUIRES_OK(context, context->allocate_output(1, key.shape(), &d_key));
    OP_REQUIRES_OK(context, context->allocate_output(2, value.shape(), &d_value));
    OP_REQUIRES_OK(context, context->allocate_output(3, has_bias_ ? bias.shape() : TensorShape({0, 0, 0, 0}),
                                                     &d_bias));
    const int64_t bias_elems = has_bias_ ? bias.NumElements() : 0;
    float* d_bias_data = d_bias->flat<float>().data();
    std::fill(d_bias_data, d_bias_data + bias_elems, 0.0f);
    if (B == 0) return;

    const int64_t G = N / K;
    const int64_t block_k = RoundUp(std::max<int64_t>(1, std::min<int64_t>(block_k_, S)), kPanel);
    const int64_t num_k = (S + block_k - 1) / block_k;
    const int64_t s_pad = num_k * block_k;
    const int64_t h_pad = RoundUp(std::max<int64_t>(H, 1), kPanel);
    const int64_t d_pad = RoundUp(std::max<int64_t>(D, 1), kPanel);
    const int64_t block_q = std::max<int64_t>(1, std::min<int64_t>(block_q_, T));
    const int64_t num_q = (T + block_q - 1) / block_q;

    const Scalar* q_data = query.flat<Scalar>().data();
    const Scalar* k_data = key.flat<Scalar>().data();
    const Scalar* v_data = value.flat<Scalar>().data();
    const Scalar* o_data = output.flat<Scalar>().data();
    const Scalar* do_data = d_output.flat<Scalar>().data();
    const float* lse_data = logsumexp.flat<float>().data();
    const float* bias_data = has_bias_ ? bias.flat<float>().data() : nullptr;
    const bool* mask_data = has_mask_ ? mask.flat<bool>().data() : nullptr;
    Scalar* dq_data = d_query->flat<Scalar>().data();
    Scalar* dk_data = d_key->flat<Scalar>().data();
    Scalar* dv_data = d_value->flat<Scalar>().data();

    // Keys no score can see are zeroed while packing, query rows that see no key
    // too: NaN there reaches no product (the reference's _hide_unseen).
    std::vector<uint8_t> key_seen;
    if (has_mask_) {
      key_seen.assign(mask_layout.dims[0] * S, 0);
      for (int64_t b = 0; b < mask_layout.dims[0]; ++b)
        for (int64_t n = 0; n < mask_layout.dims[1]; ++n)
          for (int64_t t = 0; t < mask_layout.dims[2]; ++t) {
            const bool* m = mask_data + mask_layout.Row(b, n, t);
            for (int64_t s = 0; s < S; ++s) key_seen[b * S + s] |= m[s * mask_layout.Stride()];
          }
    }
    std::vector<uint32_t> col_hash(drop.on ? s_pad : 0);
    for (int64_t s = 0; drop.on && s < s_pad; ++s) col_hash[s] = Mix(static_cast<uint32_t>(s) ^ drop.seed1);

    // Work units (see above): `colliding` items share bias-gradient elements,
    // `apart` classes of items never do; unit (slot, class) runs the items of its
    // class whose colliding index is slot modulo `slots`.
    const bool shared_b = has_bias_ && bias_layout.dims[0] == 1 && B > 1;
    const bool shared_k = has_bias_ && bias_layout.dims[1] == 1 && K > 1;
    const int64_t colliding = (shared_b ? B : 1) * (shared_k ? K : 1);
    const int64_t apart = B * K / colliding;
    const int64_t slots =
        std::clamp<int64_t>(bias_slot_bytes_ / std::max<int64_t>(1, bias_elems * 4), 1, colliding);
    Tensor extra_slots;
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_FLOAT, TensorShape({(slots - 1) * bias_elems}),
                                                   &extra_slots));
    float* extra_data = extra_slots.flat<float>().data();
    std::fill(extra_data, extra_data + (slots - 1) * bias_elems, 0.0f);

    const int64_t chunks = has_bias_ || B * K >= kMinUnits
                               ? 1
                               : std::max<int64_t>(1, std::min(num_k, (kMinUnits + B * K - 1) / (B * K)));
    Tensor partials;
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_FLOAT,
                                                   TensorShape({chunks > 1 ? chunks * B * T * N * H : 0}), &partials));
    float* partial_data = partials.flat<float>().data();
    std::fill(partial_data, partial_data + partials.NumElements(), 0.0f);

    const Primitives& prim = *primitives_;
    const float scale = scale_;
    const bool causal = is_causal_;
    const RowSource rows_of{bias_data, bias_layout, mask_data, mask_layout, causal,
                            drop.on ? col_hash.data() : nullptr};

    auto work = [&](int64_t begin, int64_t end) {
      std::vector<float> kt(s_pad * H), k_rows(s_pad * h_pad), vt(s_pad * D);
      std::vector<float> dk_acc(s_pad * h_pad), dv_acc(s_pad * d_pad);
      std::vector<float> q_tile(block_q * h_pad), do_tile(block_q * d_pad), dq_tile(block_q * h_pad);
      std::vector<float> probs(block_q * block_k), dropped(drop.on ? block_q * block_k : 0),
          d_scores(block_q * block_k);
      std::vector<float> lse(block_q), delta(block_q);
      std::vector<uint32_t> row_hash(block_q);
      const float* pd_tile = drop.on ? dropped.data() : probs.data();

      // Item (b, k) over key blocks [j_begin, j_end); dq goes to d_query, or with
      // chunks to its float32 partial [B, T, N, H] (unscaled).
      auto item = [&](int64_t b, int64_t k, int64_t j_begin, int64_t j_end, float* d_bias_slot,
                      float* dq_partial) {
        // Keys as [s_pad/16][H][16] panels (for S = Q·Kᵀ) and as rows [s_pad][h_pad]
        // (for dQ = dS·K); values as [s_pad/16][D][16] panels (for dP = dO·Vᵀ).
        const uint8_t* seen = has_mask_ ? key_seen.data() + (mask_layout.dims[0] == 1 ? 0 : b) * S : nullptr;
        for (int64_t s = j_begin * block_k; s < j_end * block_k; ++s) {
          const bool keep = s < S && (seen == nullptr || seen[s]);
          const Scalar* k_src = k_data + ((b * S + std::min(s, S - 1)) * K + k) * H;
          const Scalar* v_src = v_data + ((b * S + std::min(s, S - 1)) * K + k) * D;
          float* k_lane = kt.data() + (s / kPanel) * H * kPanel + (s % kPanel);
          float* k_row = k_rows.data() + s * h_pad;
          float* v_lane = vt.data() + (s / kPanel) * D * kPanel + (s % kPanel);
          for (int64_t h = 0; h < H; ++h) k_lane[h * kPanel] = keep ? static_cast<float>(k_src[h]) : 0.0f;
          for (int64_t h = 0; h < h_pad; ++h) k_row[h] = keep && h < H ? static_cast<float>(k_src[h]) : 0.0f;
          for (int64_t d = 0; d < D; ++d) v_lane[d * kPanel] = keep ? static_cast<float>(v_src[d]) : 0.0f;
        }
        std::fill(dk_acc.begin() + j_begin * block_k * h_pad, dk_acc.begin() + j_end * block_k * h_pad, 0.0f);
        std::fill(dv_acc.begin() + j_begin * block_k * d_pad, dv_acc.begin() + j_end * block_k * d_pad, 0.0f);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t n = k * G + g;
          for (int64_t qi = 0; qi < num_q; ++qi) {
            const int64_t t0 = qi * block_q;
            const int64_t rows = std::min(block_q, T - t0);
            // Causal: the block's last row sees keys up to t0 + rows - 1.
            const int64_t key_end = std::min(causal ? std::min(S, t0 + rows) : S, j_end * block_k);
            if (key_end <= j_begin * block_k && dq_partial != nullptr) continue;  // its partial rows stay 0
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t t = t0 + r;
              bool row_seen = true;
              if (has_mask_) {
                const bool* m = mask_data + mask_layout.Row(b, n, t);
                row_seen = false;
                for (int64_t s = 0; s < S && !row_seen; ++s) row_seen = m[s * mask_layout.Stride()];
              }
              const Scalar* q_src = q_data + ((b * T + t) * N + n) * H;
              for (int64_t h = 0; h < h_pad; ++h) {
                q_tile[r * h_pad + h] = row_seen && h < H ? static_cast<float>(q_src[h]) * scale : 0.0f;
              }
              const Scalar* o_src = o_data + ((b * T + t) * N + n) * D;
              const Scalar* do_src = do_data + ((b * T + t) * N + n) * D;
              float dot = 0.0f;
              for (int64_t d = 0; d < d_pad; ++d) {
                const float x = d < D ? static_cast<float>(do_src[d]) : 0.0f;
                do_tile[r * d_pad + d] = x;
                if (d < D) dot += x * static_cast<float>(o_src[d]);
              }
              delta[r] = dot;
              lse[r] = lse_data[(b * N + n) * T + t];
              if (drop.on) row_hash[r] = Mix(static_cast<uint32_t>((b * N + n) * T + t) ^ drop.seed0_mixed);
            }
            std::fill(dq_tile.begin(), dq_tile.begin() + rows * h_pad, 0.0f);
            for (int64_t j = j_begin; j * block_k < key_end; ++j) {
              const int64_t c0 = j * block_k;
              const int64_t keys = std::min(block_k, key_end - c0);
              const int64_t cols = RoundUp(keys, kPanel);
              prim.gemm(q_tile.data(), h_pad, 1, rows, H, kt.data() + c0 * H, kPanel * H, kPanel, cols,
                        probs.data(), block_k, false);
              for (int64_t r = 0; r < rows; ++r) {
                const RowContext row = rows_of.Row(b, n, t0 + r, c0, keys, row_hash[r]);
                prim.probs(probs.data() + r * block_k, cols, row, drop, lse[r], probs.data() + r * block_k,
                           drop.on ? dropped.data() + r * block_k : nullptr);
              }
              // dV_j += Pdᵀ·dO_i: Pd read transposed in place.
              prim.gemm(pd_tile, 1, block_k, keys, rows, do_tile.data(), kPanel, d_pad, d_pad,
                        dv_acc.data() + c0 * d_pad, d_pad, true);
              prim.gemm(do_tile.data(), d_pad, 1, rows, D, vt.data() + c0 * D, kPanel * D, kPanel, cols,
                        d_scores.data(), block_k, false);
              for (int64_t r = 0; r < rows; ++r) {
                float* ds = d_scores.data() + r * block_k;
                prim.dscore(probs.data() + r * block_k, pd_tile + r * block_k, ds, cols, delta[r], ds);
                if (has_bias_) {
                  float* dst = d_bias_slot + bias_layout.Row(b, n, t0 + r) + c0 * bias_layout.Stride();
                  if (bias_layout.Stride() == 0) {
                    float sum = 0.0f;
                    for (int64_t c = 0; c < keys; ++c) sum += ds[c];
                    dst[0] += sum;
                  } else {
                    for (int64_t c = 0; c < keys; ++c) dst[c] += ds[c];
                  }
                }
              }
              prim.gemm(d_scores.data(), block_k, 1, rows, keys, k_rows.data() + c0 * h_pad, kPanel, h_pad, h_pad,
                        dq_tile.data(), h_pad, true);
              // dK_j += dSᵀ·Q_i: dS read transposed in place.
              prim.gemm(d_scores.data(), 1, block_k, keys, rows, q_tile.data(), kPanel, h_pad, h_pad,
                        dk_acc.data() + c0 * h_pad, h_pad, true);
            }
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t offset = ((b * T + t0 + r) * N + n) * H;
              const float* src = dq_tile.data() + r * h_pad;
              if (dq_partial != nullptr) {
                std::copy(src, src + H, dq_partial + offset);
              } else {
                for (int64_t h = 0; h < H; ++h) dq_data[offset + h] = static_cast<Scalar>(src[h] * scale);
              }
            }
          }
        }
        for (int64_t s = j_begin * block_k; s < std::min(S, j_end * block_k); ++s) {
          Scalar* dk_dst = dk_data + ((b * S + s) * K + k) * H;
          Scalar* dv_dst = dv_data + ((b * S + s) * K + k) * D;
          for (int64_t h = 0; h < H; ++h) dk_dst[h] = static_cast<Scalar>(dk_acc[s * h_pad + h]);
          for (int64_t d = 0; d < D; ++d) dv_dst[d] = static_cast<Scalar>(dv_acc[s * d_pad + d]);
        }
      };

      for (int64_t unit = begin; unit < end; ++unit) {
        if (chunks > 1) {
          const int64_t chunk = unit % chunks, bk = unit / chunks;
          const int64_t j_begin = chunk * num_k / chunks, j_end = (chunk + 1) * num_k / chunks;
          item(bk / K, bk % K, j_begin, j_end, nullptr, partial_data + chunk * B * T * N * H);
          continue;
        }
        const int64_t slot = unit / apart, kind = unit % apart;
        float* d_bias_slot = slot == 0 ? d_bias_data : extra_data + (slot - 1) * bias_elems;
        for (int64_t c = slot; c < colliding; c += slots) {
          const int64_t b = shared_b ? c / (shared_k ? K : 1) : kind / (shared_k ? 1 : K);
          const int64_t k = shared_k ? c % K : kind % K;
          item(b, k, 0, num_k, d_bias_slot, nullptr);
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    const int64_t units = chunks > 1 ? B * K * chunks : slots * apart;
    const int64_t cost = B * K * G * std::max<int64_t>(T, 1) * std::max<int64_t>(S, 1) * (H + D) * 5 / units;
    workers->workers->ParallelFor(units, cost, work);
    if (chunks > 1) {
      // Partials summed in chunk order, whichever thread wrote them.
      const int64_t size = B * T * N * H;
      for (int64_t e = 0; e < size; ++e) {
        float sum = 0.0f;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial_data[chunk * size + e];
        dq_data[e] = static_cast<Scalar>(sum * scale);
      }
    }
    for (int64_t slot = 1; slot < slots; ++slot) {
      const float* src = extra_data + (slot - 1) * bias_elems;
      for (int64_t e = 0; e < bias_elems; ++e) d_bias_data[e] += src[e];
    }
  }

 private:
  int64_t bias_slot_bytes_;
};

#define FASTLAYERS_REGISTER(type)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                             \
      Name("FastlayersAttentionBackward").Device(tensorflow::DEVICE_CPU).TypeConstraint<type>("T"), \
      AttentionBackwardOp<type>)
FASTLAYERS_REGISTER(float);
FASTLAYERS_REGISTER(Eigen::half);
FASTLAYERS_REGISTER(Eigen::bfloat16);
#undef FASTLAYERS_REGISTER

}  // namespace fastlayers
