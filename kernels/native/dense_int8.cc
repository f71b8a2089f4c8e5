// Keras's int8 Dense on CPU in one op: per-row abs-max quantization of the inputs,
// an exact int8 GEMM with int32 sums, and the dequantize + bias + activation epilogue.
//
// Shape letters: M rows, K features, N units. x [M, K] float32, kernel [K, N] int8
// (Keras's `_kernel` after `quantize("int8")`), kernel_scale [N] float32, bias [N]
// float32 (or [0]: none); output [M, N] float32.
//
// Semantics (Keras's `AbsMaxQuantizer` and `Dense._int8_call`, float32, op by op as
// TensorFlow computes them, so the outputs are bit-equal to Keras's):
//   s[m]    = 127 / (max_k |x[m, k]| + epsilon)          (max of no element: -inf)
//   xq[m,k] = clip(round_half_even(x[m, k] * s[m]), -127, 127)
//   acc     = sum_k xq[m, k] * kernel[k, n]                 exact, int32
//   y[m,n]  = activation(float(acc) / (kernel_scale[n] * s[m]) + bias[n])
//
// The product is exact. xq lies in [-127, 127] (the clip) and the kernel in
// [-128, 127] (any int8: Keras's own quantizer gives [-127, 127], but a custom weight
// quantizer or an assignment can hold -128). AVX2's int8 multiply, vpmaddubsw,
// multiplies unsigned by signed bytes and adds adjacent pairs into int16 with
// saturation, so the AVX2 path feeds it |w| (vpabsb; -128 gives 128 as an unsigned
// byte) and sign(xq, w) (vpsignb: xq negated where w < 0, zero where w = 0, never
// -128 since xq is not): |w| · sign(xq, w) = xq · w, and a pair sums to at most
// 2 · 128 · 127 = 32512 < 32767 in magnitude, so nothing saturates. vpmaddwd by ones
// then adds neighbouring pairs into int32 (four features per lane), added to int32
// accumulators. The other route, widening both operands to int16 and multiplying
// pairs with vpmaddwd alone, takes as many instructions per multiply-add, but
// instruction count is not what bounds it: vpmaddwd's throughput is. Here each
// vpmaddwd sums four features per lane instead of two, and the byte instructions
// that come with it (vpsignb, vpmaddubsw) cost this CPU less than the second
// vpmaddwd they replace, so the sequence does more multiply-adds per cycle (measured
// on one core with independent chains, and in the op).
//
// Layouts. The kernel is packed once into int8 panels of kNr = 16 units, quads of
// features side by side: panel j is [Q][16][4] with Q = ceil(K / 4) quads, so one
// 64-byte row of a panel is two ymm registers of (k..k+3) quads for 8 units each.
// The packed kernel is cached by the address of the kernel's buffer and checked
// against a copy of the kernel on every call (a byte compare, cheaper than a
// packing): a kernel assigned since it was packed is packed again, never used stale.
// The inputs are quantized per call into row panels of kMr = 4 rows, [Q][4] int32
// (each an int8 quad), the broadcast operand of the micro-kernel, which takes a
// kernel panel and a tile's row panels, as many at once as its ISA's registers hold.
// Features past K are zeros on both sides, which adds nothing.
//
// Work: tiles of kMc rows by kNc units, shared out over TensorFlow's intra-op pool.
// A tile walks the features in blocks of kKcQuads quads (the kernel's micro-panel
// stays in L1 while every row panel of the tile passes over it) into an int32 tile,
// then runs the epilogue on it.
//
// ISA dispatch: the micro-kernel comes as a portable loop, an AVX2 one and an
// AVX512-VNNI one (each compiled with a per-function target, chosen at run time from
// what the CPU reports); all read the same packed layout and give the same int32
// sums. The VNNI one multiplies the same |w| and sign(xq, w) with vpdpbusd, which
// adds four u8 · s8 products into each int32 lane without saturating, in place of
// vpmaddubsw + vpmaddwd + vpaddd; one kernel row of a panel is one zmm register,
// and AVX-512 having no vpsignb, sign(xq, w) is xq negated under the mask of w's
// sign bits (vpmovb2m once per kernel row, a masked vpsubb per row quad). It takes
// four row panels (16 rows, 16 accumulators) per kernel panel, enough independent
// chains to cover vpdpbusd's latency. No CPU here has VNNI: the tests run it through
// SIMDe's portable intrinsics (isa.h), which checks its sums bit for bit; its speed
// is unmeasured.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

#include "isa.h"

namespace fastlayers {
namespace int8 {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace errors = tensorflow::errors;

constexpr int64_t kMr = 4;    // rows of the micro-kernel
constexpr int64_t kNr = 16;   // units of the micro-kernel (two ymm of int32)
constexpr int64_t kQuad = 4;  // features per int32 lane of a product
// Feature quads per block: the kernel's micro-panel (kKcQuads · 64 bytes) takes half
// of L1, beside the row panel streaming over it (a quarter of its size); a longer
// block leaves L1 too little room for the row panels. A tile's row panels for one
// block (read by each of its kernel micro-panels, then by the next tile, which shares
// its rows) and its int32 tile stay in L2; each kernel micro-panel passes once per
// tile. A block spans widths up to 1024 features, whose int32 tile is written once.
constexpr int64_t kKcQuads = 256;
constexpr int64_t kMc = 24 * kMr;  // rows of a tile
constexpr int64_t kNc = 16 * kNr;  // units of a tile
// The packed kernels kept at once; past this the least recently used goes.
constexpr int64_t kCacheBytes = int64_t{1} << 30;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One kernel panel against `panels` row panels: for each row panel p,
// c[(p * kMr + r) * ldc + n] (+)= sum over quads q and h < 4 of xq[p][r][4q + h] ·
// w[4q + h][n], for r < kMr, n < kNr: a[p * a_stride + q * kMr + r] holds row r's quad q
// (four int8), b[(q * kNr + n) * 4 + h] the kernel's. `accumulate` false starts from
// zero. Each ISA groups the row panels as its registers allow.
struct Primitives {
  const char* name;
  void (*micro)(const int32_t* a, int64_t a_stride, int64_t panels, const int8_t* b, int64_t quads,
                int32_t* c, int64_t ldc, bool accumulate);
  // One row: its abs-max (as TensorFlow's reduce_max: -inf for no element).
  float (*abs_max)(const float* x, int64_t k);
  // q[i] = clip(round_half_even(x[i] * scale), -127, 127), i < k.
  void (*quantize)(const float* x, int64_t k, float scale, int8_t* q);
  // out[j] = activation(float(acc[j]) / (kscale[j] * s) + bias[j]), j < cols;
  // bias may be nullptr. Relu is TensorFlow's: a NaN stays NaN.
  void (*epilogue)(const int32_t* acc, int64_t cols, float s, const float* kscale,
                   const float* bias, bool relu, float* out);
};

// ---------------------------------------------------------------------------------
// Portable primitives.

// The micro-kernel for one row panel (a kMr x kNr tile of c).
void PanelPortable(const int32_t* a, const int8_t* b, int64_t quads, int32_t* c, int64_t ldc,
                   bool accumulate) {
  int32_t acc[kMr][kNr];
  for (int64_t r = 0; r < kMr; ++r)
    for (int64_t n = 0; n < kNr; ++n) acc[r][n] = accumulate ? c[r * ldc + n] : 0;
  for (int64_t q = 0; q < quads; ++q) {
    const int8_t* bq = b + q * kNr * kQuad;
    for (int64_t r = 0; r < kMr; ++r) {
      int8_t x[kQuad];
      std::memcpy(x, a + q * kMr + r, kQuad);
      for (int64_t n = 0; n < kNr; ++n) {
        const int8_t* w = bq + n * kQuad;
        acc[r][n] += int32_t{x[0]} * w[0] + int32_t{x[1]} * w[1] + int32_t{x[2]} * w[2] + int32_t{x[3]} * w[3];
      }
    }
  }
  for (int64_t r = 0; r < kMr; ++r)
    for (int64_t n = 0; n < kNr; ++n) c[r * ldc + n] = acc[r][n];
}

// The micro-kernel of a table whose tiles are one row panel: the row panels in turn.
template <void (*Panel)(const int32_t*, const int8_t*, int64_t, int32_t*, int64_t, bool)>
void EachPanel(const int32_t* a, int64_t a_stride, int64_t panels, const int8_t* b, int64_t quads,
               int32_t* c, int64_t ldc, bool accumulate) {
  for (int64_t p = 0; p < panels; ++p) Panel(a + p * a_stride, b, quads, c + p * kMr * ldc, ldc, accumulate);
}

float AbsMaxPortable(const float* x, int64_t k) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < k; ++i) peak = std::max(peak, std::fabs(x[i]));
  return peak;
}

void QuantizePortable(const float* x, int64_t k, float scale, int8_t* q) {
  for (int64_t i = 0; i < k; ++i) {
    // nearbyint rounds half to even (the default rounding mode), as tf.round.
    const float r = std::nearbyint(x[i] * scale);
    q[i] = static_cast<int8_t>(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
  }
}

void EpiloguePortable(const int32_t* acc, int64_t cols, float s, const float* kscale,
                      const float* bias, bool relu, float* out) {
  for (int64_t j = 0; j < cols; ++j) {
    float v = static_cast<float>(acc[j]) / (kscale[j] * s);
    if (bias != nullptr) v += bias[j];
    if (relu) v = v < 0.0f ? 0.0f : v;
    out[j] = v;
  }
}

constexpr Primitives kPortable = {"portable", EachPanel<PanelPortable>, AbsMaxPortable,
                                  QuantizePortable, EpiloguePortable};

// ---------------------------------------------------------------------------------
// AVX2 primitives.

#ifdef FASTLAYERS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// One row's quad of inputs times the 16 units' kernel quads (w0, w1; u0, u1 their
// magnitudes), added to the row's two accumulators: |w| · sign(xq, w) = xq · w by
// bytes, pairs of those into int16 (exact, see the header), pairs of pairs into int32.
inline void RowQuad(int32_t quad, __m256i u0, __m256i u1, __m256i w0, __m256i w1, __m256i ones,
                    __m256i* c0, __m256i* c1) {
  const __m256i x = _mm256_set1_epi32(quad);
  *c0 = _mm256_add_epi32(*c0, _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(x, w0)), ones));
  *c1 = _mm256_add_epi32(*c1, _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(x, w1)), ones));
}

void PanelAvx2(const int32_t* a, const int8_t* b, int64_t quads, int32_t* c, int64_t ldc,
               bool accumulate) {
  // Eight accumulators, the kernel quads and their magnitudes (four registers), the
  // broadcast row quad, a product and the ones: 15 of the 16 ymm registers, so
  // nothing spills. Twelve accumulators (6 x 16, 4 x 24) leave too few registers for
  // the rest: the compiler spills them, and even without spills (operands from
  // memory) the measured rate was lower.
  __m256i c00, c01, c10, c11, c20, c21, c30, c31;
  if (accumulate) {
    c00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 0 * ldc));
    c01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 0 * ldc + 8));
    c10 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 1 * ldc));
    c11 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 1 * ldc + 8));
    c20 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 2 * ldc));
    c21 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 2 * ldc + 8));
    c30 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 3 * ldc));
    c31 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 3 * ldc + 8));
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = _mm256_setzero_si256();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < quads; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
    RowQuad(a[0], u0, u1, w0, w1, ones, &c00, &c01);
    RowQuad(a[1], u0, u1, w0, w1, ones, &c10, &c11);
    RowQuad(a[2], u0, u1, w0, w1, ones, &c20, &c21);
    RowQuad(a[3], u0, u1, w0, w1, ones, &c30, &c31);
    a += kMr;
    b += kNr * kQuad;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 0 * ldc), c00);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 0 * ldc + 8), c01);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 1 * ldc), c10);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 1 * ldc + 8), c11);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 2 * ldc), c20);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 2 * ldc + 8), c21);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 3 * ldc), c30);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 3 * ldc + 8), c31);
}

float AbsMaxAvx2(const float* x, int64_t k) {
  // max is exact and order-free (NaN aside: a NaN row quantizes to garbage in
  // TensorFlow too), so the vector sweep gives reduce_max's value.
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 peak = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peak);
  float result = lanes[0];
  for (int l = 1; l < 8; ++l) result = std::max(result, lanes[l]);
  for (; i < k; ++i) result = std::max(result, std::fabs(x[i]));
  return result;
}

void QuantizeAvx2(const float* x, int64_t k, float scale, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  // The packs work per 128-bit lane (exactly: the values are in [-127, 127]): after
  // both, lane l holds lane l of r[0], r[1], r[2], r[3] in turn as four 4-byte
  // groups; the permute puts the eight groups back in feature order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m256i r[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), s),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    }
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(packed, order));
  }
  QuantizePortable(x + i, k - i, scale, q + i);
}

void EpilogueAvx2(const int32_t* acc, int64_t cols, float s, const float* kscale,
                  const float* bias, bool relu, float* out) {
  const __m256 sv = _mm256_set1_ps(s), zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)));
    __m256 v = _mm256_div_ps(a, _mm256_mul_ps(_mm256_loadu_ps(kscale + j), sv));
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    // max_ps returns its second operand when either is NaN or both are zeros.
    if (relu) v = _mm256_max_ps(zero, v);
    _mm256_storeu_ps(out + j, v);
  }
  EpiloguePortable(acc + j, cols - j, s, kscale + j, bias == nullptr ? nullptr : bias + j, relu, out + j);
}

#pragma GCC pop_options

constexpr Primitives kAvx2 = {"avx2", EachPanel<PanelAvx2>, AbsMaxAvx2, QuantizeAvx2, EpilogueAvx2};

// ---------------------------------------------------------------------------------
// AVX512-VNNI primitives: vpdpbusd adds the four u8 · s8 products of each int32 lane
// into it in one instruction, with no intermediate saturation, so it takes |w| and
// sign(xq, w) as vpmaddubsw does and replaces vpmaddubsw + vpmaddwd + vpaddd. One
// 64-byte row of a kernel panel (16 units x a quad) is one zmm register. Tests run
// them through SIMDe (isa.h) on CPUs without AVX-512.

FASTLAYERS_AVX512VNNI_BEGIN
namespace vnni {

// Row panels per tile: 4 x kMr = 16 rows, one accumulator each. vpdpbusd has a
// latency of about 5 cycles and up to two issue per cycle, so at least 10 independent
// chains keep it busy; 16 leave room. The tile's 16 accumulators, |w|, the zero and a
// broadcast row quad and its signed copy take 20 of the 32 zmm registers (the sign
// mask lives in a mask register). Grouping rows rather than kernel panels keeps the
// kernel's micro-panel the only operand that must stay in L1 (as in the AVX2 path);
// a tile's rows stream one 64-byte line per quad.
constexpr int kPanels = 4;

// The tile of `R` row panels (R · kMr rows) by one kernel panel.
template <int R>
inline void Tile(const int32_t* a, int64_t a_stride, const int8_t* b, int64_t quads, int32_t* c,
                 int64_t ldc, bool accumulate) {
  constexpr int kRows = R * kMr;
  const __m512i zero = _mm512_setzero_si512();
  __m512i acc[kRows];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) acc[r] = accumulate ? _mm512_loadu_si512(c + r * ldc) : zero;
  for (int64_t q = 0; q < quads; ++q) {
    const __m512i w = _mm512_loadu_si512(b + q * kNr * kQuad);
    // vpabsb gives -128 as 128, right as an unsigned byte; xq (never -128) negated
    // where w < 0 is sign(xq, w) but for w = 0, where |w| = 0 makes it not matter.
    const __m512i magnitude = _mm512_abs_epi8(w);
    const __mmask64 negative = _mm512_movepi8_mask(w);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m512i x = _mm512_set1_epi32(a[(r / kMr) * a_stride + q * kMr + r % kMr]);
      acc[r] = _mm512_dpbusd_epi32(acc[r], magnitude, _mm512_mask_sub_epi8(x, negative, zero, x));
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) _mm512_storeu_si512(c + r * ldc, acc[r]);
}

void Micro(const int32_t* a, int64_t a_stride, int64_t panels, const int8_t* b, int64_t quads,
           int32_t* c, int64_t ldc, bool accumulate) {
  int64_t p = 0;
  for (; p + kPanels <= panels; p += kPanels)
    Tile<kPanels>(a + p * a_stride, a_stride, b, quads, c + p * kMr * ldc, ldc, accumulate);
  const int32_t* a_rest = a + p * a_stride;
  int32_t* c_rest = c + p * kMr * ldc;
  switch (panels - p) {
    case 3: Tile<3>(a_rest, a_stride, b, quads, c_rest, ldc, accumulate); break;
    case 2: Tile<2>(a_rest, a_stride, b, quads, c_rest, ldc, accumulate); break;
    case 1: Tile<1>(a_rest, a_stride, b, quads, c_rest, ldc, accumulate); break;
    default: break;
  }
}

}  // namespace vnni
FASTLAYERS_AVX512VNNI_END

// The other primitives are AVX2's: they run once per input or output element, not per
// product (K + N against K · N per row), so wider registers would gain them little.
constexpr Primitives kAvx512Vnni = {"avx512vnni", vnni::Micro, AbsMaxAvx2, QuantizeAvx2, EpilogueAvx2};
constexpr const Primitives* kTables[] = {&kAvx512Vnni, &kAvx2, &kPortable};
#else
constexpr const Primitives* kTables[] = {&kPortable};
#endif  // FASTLAYERS_X86

// ---------------------------------------------------------------------------------
// The packed-kernel cache.

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

struct PackedKernel {
  const void* address = nullptr;
  int64_t k = 0, n = 0;
  std::vector<int8_t> source;                      // the kernel it was packed from
  std::unique_ptr<int8_t[], AlignedFree> panels;  // [ceil(N/16)][Q][16][4]
  int64_t Bytes() const { return static_cast<int64_t>(source.size()) * 2; }
};

class KernelCache {
 public:
  static KernelCache& Get() {
    static KernelCache* cache = new KernelCache();
    return *cache;
  }

  // The packed form of `kernel` [K, N], packed now unless a cached one matches it
  // byte for byte.
  std::shared_ptr<const PackedKernel> Find(const int8_t* kernel, int64_t k, int64_t n,
                                           const tensorflow::DeviceBase::CpuWorkerThreads& workers) {
    std::shared_ptr<const PackedKernel> found;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if ((*it)->address == kernel && (*it)->k == k && (*it)->n == n) {
          found = *it;
          entries_.splice(entries_.begin(), entries_, it);
          break;
        }
      }
    }
    const size_t bytes = static_cast<size_t>(k * n);
    if (found && (bytes == 0 || std::memcmp(found->source.data(), kernel, bytes) == 0)) return found;
    auto packed = std::make_shared<PackedKernel>();
    packed->address = kernel;
    packed->k = k;
    packed->n = n;
    packed->source.assign(kernel, kernel + bytes);
    Pack(kernel, k, n, workers, packed.get());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      entries_.remove_if([&](const std::shared_ptr<const PackedKernel>& e) {
        return e->address == kernel && e->k == k && e->n == n;
      });
      entries_.push_front(packed);
      int64_t total = 0;
      for (auto it = entries_.begin(); it != entries_.end();) {
        total += (*it)->Bytes();
        if (total > kCacheBytes && it != entries_.begin()) {
          it = entries_.erase(it);
        } else {
          ++it;
        }
      }
    }
    return packed;
  }

  int64_t Size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(entries_.size());
  }

 private:
  static void Pack(const int8_t* kernel, int64_t k, int64_t n,
                   const tensorflow::DeviceBase::CpuWorkerThreads& workers, PackedKernel* packed) {
    const int64_t quads = CeilDiv(k, kQuad), panels = CeilDiv(n, kNr);
    const int64_t elements = std::max<int64_t>(panels * quads * kNr * kQuad, 1);
    const size_t size = static_cast<size_t>(CeilDiv(elements, 64) * 64);
    packed->panels.reset(static_cast<int8_t*>(std::aligned_alloc(64, size)));
    int8_t* out = packed->panels.get();
    auto pack = [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        int8_t* panel = out + j * quads * kNr * kQuad;
        for (int64_t q = 0; q < quads; ++q) {
          for (int64_t c = 0; c < kNr; ++c) {
            const int64_t col = j * kNr + c;
            for (int64_t h = 0; h < kQuad; ++h) {
              const int64_t row = kQuad * q + h;
              panel[(q * kNr + c) * kQuad + h] = (row < k && col < n) ? kernel[row * n + col] : 0;
            }
          }
        }
      }
    };
    tensorflow::Shard(workers.num_threads, workers.workers, panels, quads * kNr * kQuad * 4, pack);
  }

  std::mutex mutex_;
  std::list<std::shared_ptr<const PackedKernel>> entries_;
};

// ---------------------------------------------------------------------------------
// The ops.

REGISTER_OP("FastlayersDenseInt8")
    .Input("x: float")
    .Input("kernel: int8")
    .Input("kernel_scale: float")
    .Input("bias: float")
    .Output("y: float")
    .Attr("epsilon: float")
    .Attr("activation: {'linear', 'relu'} = 'linear'")
    .Attr("has_bias: bool = false")
    .Attr("isa: {'best', 'avx512vnni', 'avx2', 'portable'} = 'best'")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle x, kernel;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &kernel));
      c->set_output(0, c->MakeShape({c->Dim(x, 0), c->Dim(kernel, 1)}));
      return absl::OkStatus();
    });

REGISTER_OP("FastlayersDenseInt8Isa")
    .Output("isa: string")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

REGISTER_OP("FastlayersDenseInt8CachedKernels")
    .Output("count: int64")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

class CachedKernelsOp : public OpKernel {
 public:
  explicit CachedKernelsOp(OpKernelConstruction* context) : OpKernel(context) {}
  void Compute(OpKernelContext* context) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = KernelCache::Get().Size();
  }
};

class DenseInt8Op : public OpKernel {
 public:
  explicit DenseInt8Op(OpKernelConstruction* context) : OpKernel(context) {
    std::string isa, activation;
    OP_REQUIRES_OK(context, context->GetAttr("isa", &isa));
    primitives_ = ChooseIsa(kTables, isa);
    OP_REQUIRES(context, primitives_ != nullptr, errors::InvalidArgument(IsaError(kTables, isa)));
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(context, context->GetAttr("activation", &activation));
    relu_ = activation == "relu";
    OP_REQUIRES_OK(context, context->GetAttr("has_bias", &has_bias_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& kernel = context->input(1);
    const Tensor& kernel_scale = context->input(2);
    const Tensor& bias = context->input(3);
    OP_REQUIRES(context, x.dims() == 2,
                errors::InvalidArgument("x must have rank 2 ([M, K]). Received: x.shape=",
                                        x.shape().DebugString()));
    OP_REQUIRES(context, kernel.dims() == 2 && kernel.dim_size(0) == x.dim_size(1),
                errors::InvalidArgument("kernel must have shape [K, N] with K = ", x.dim_size(1),
                                        ", the last axis of x. Received: kernel.shape=",
                                        kernel.shape().DebugString()));
    const int64_t M = x.dim_size(0), K = x.dim_size(1), N = kernel.dim_size(1);
    OP_REQUIRES(context, kernel_scale.dims() == 1 && kernel_scale.dim_size(0) == N,
                errors::InvalidArgument("kernel_scale must have shape [N] = [", N,
                                        "]. Received: kernel_scale.shape=",
                                        kernel_scale.shape().DebugString()));
    OP_REQUIRES(context, !has_bias_ || (bias.dims() == 1 && bias.dim_size(0) == N),
                errors::InvalidArgument("bias must have shape [N] = [", N,
                                        "]. Received: bias.shape=", bias.shape().DebugString()));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({M, N}), &output));
    if (M == 0 || N == 0) return;

    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    const Primitives& prim = *primitives_;
    const int64_t quads = CeilDiv(K, kQuad);
    const int64_t row_panels = CeilDiv(M, kMr);

    std::shared_ptr<const PackedKernel> packed =
        KernelCache::Get().Find(kernel.flat<int8_t>().data(), K, N, workers);

    // Quantize the rows into [row_panels][Q][kMr] int8 quads, padded with zeros.
    Tensor a_tensor, scale_tensor;
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_INT32,
                                                   TensorShape({std::max<int64_t>(row_panels * quads * kMr, 1)}),
                                                   &a_tensor));
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_FLOAT, TensorShape({M}), &scale_tensor));
    int32_t* a_all = a_tensor.flat<int32_t>().data();
    float* scales = scale_tensor.flat<float>().data();
    const float* x_data = x.flat<float>().data();
    const float epsilon = epsilon_;
    auto quantize = [&](int64_t begin, int64_t end) {
      std::vector<int8_t> row(quads * kQuad);
      for (int64_t panel = begin; panel < end; ++panel) {
        int32_t* a = a_all + panel * quads * kMr;
        for (int64_t r = 0; r < kMr; ++r) {
          const int64_t m = panel * kMr + r;
          std::fill(row.begin(), row.end(), 0);
          if (m < M) {
            const float* src = x_data + m * K;
            const float scale = 127.0f / (prim.abs_max(src, K) + epsilon);
            scales[m] = scale;
            prim.quantize(src, K, scale, row.data());
          }
          for (int64_t q = 0; q < quads; ++q) std::memcpy(a + q * kMr + r, row.data() + q * kQuad, kQuad);
        }
      }
    };
    tensorflow::Shard(workers.num_threads, workers.workers, row_panels, kMr * K * 8, quantize);

    const int8_t* b_all = packed->panels.get();
    const float* kscale = kernel_scale.flat<float>().data();
    const float* bias_data = has_bias_ ? bias.flat<float>().data() : nullptr;
    float* y = output->flat<float>().data();
    const bool relu = relu_;
    const int64_t row_tiles = CeilDiv(M, kMc), col_tiles = CeilDiv(N, kNc);

    auto tile_work = [&](int64_t begin, int64_t end) {
      std::vector<int32_t> c(kMc * kNc);
      for (int64_t item = begin; item < end; ++item) {
        // Column tiles vary fastest: neighbouring items share their rows' panels.
        const int64_t m0 = (item / col_tiles) * kMc, n0 = (item % col_tiles) * kNc;
        const int64_t rows = std::min(kMc, M - m0), cols = std::min(kNc, N - n0);
        const int64_t panels_m = CeilDiv(rows, kMr), panels_n = CeilDiv(cols, kNr);
        const int64_t ldc = panels_n * kNr;
        if (quads == 0) std::fill(c.begin(), c.end(), 0);
        for (int64_t q0 = 0; q0 < quads; q0 += kKcQuads) {
          const int64_t block = std::min(kKcQuads, quads - q0);
          const int32_t* a = a_all + ((m0 / kMr) * quads + q0) * kMr;
          for (int64_t jn = 0; jn < panels_n; ++jn) {
            const int8_t* b = b_all + ((n0 / kNr + jn) * quads + q0) * kNr * kQuad;
            prim.micro(a, quads * kMr, panels_m, b, block, c.data() + jn * kNr, ldc, q0 > 0);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          prim.epilogue(c.data() + r * ldc, cols, scales[m0 + r], kscale + n0,
                        bias_data == nullptr ? nullptr : bias_data + n0, relu, y + (m0 + r) * N + n0);
        }
      }
    };
    const int64_t cost = kMc * kNc * std::max<int64_t>(K, 1);
    workers.workers->ParallelFor(row_tiles * col_tiles, cost, tile_work);
  }

 private:
  const Primitives* primitives_;
  float epsilon_;
  bool relu_;
  bool has_bias_;
};

REGISTER_KERNEL_BUILDER(Name("FastlayersDenseInt8").Device(tensorflow::DEVICE_CPU), DenseInt8Op);
REGISTER_KERNEL_BUILDER(Name("FastlayersDenseInt8Isa").Device(tensorflow::DEVICE_CPU), BestIsaOp<kTables>);
REGISTER_KERNEL_BUILDER(Name("FastlayersDenseInt8CachedKernels").Device(tensorflow::DEVICE_CPU),
                        CachedKernelsOp);

}  // namespace int8
}  // namespace fastlayers
