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
// The product is exact: both operands lie in [-127, 127]. This CPU family's int8
// instruction (vpmaddubsw, u8 x s8) saturates its int16 pair sums, so the AVX2 path
// widens both operands to int16 and multiplies pairs with vpmaddwd into int32
// (a·b + a'·b' <= 2·127·127 fits easily), as many multiply-adds per instruction as
// vpmaddubsw + vpmaddwd would give together.
//
// Layouts. The kernel is packed once into int16 panels of kNr = 16 units, pairs of
// features side by side: panel j is [P][16][2] with P = ceil(K / 2) pairs, so one
// 64-byte row of a panel is two ymm registers of (k, k+1) pairs for 16 units. The
// packed kernel is cached by the address of the kernel's buffer and checked against
// a copy of the kernel on every call (a byte compare, about a tenth of a packing):
// a kernel assigned since it was packed is packed again, never used stale.
// The inputs are quantized per call into row panels of kMr = 6 rows, [P][6] int32
// (each an int16 pair), the broadcast operand of the micro-kernel.
//
// Work: tiles of kMc rows by kNc units, shared out over TensorFlow's intra-op pool.
// A tile walks the features in blocks of kKcPairs pairs (the kernel's micro-panel
// stays in L1 while every row panel of the tile passes over it) into an int32 tile,
// then runs the epilogue on it.
//
// ISA dispatch: the micro-kernel comes as a portable loop and an AVX2 one (compiled
// with a per-function target, chosen at run time from what the CPU reports). A CPU
// with VNNI (AVX-VNNI or AVX512-VNNI vpdpbusd, or AMX-INT8) would take one more
// Primitives entry with int8 quad packing, u8 inputs offset by 128 and a per-unit
// correction of 128·sum_k kernel[k, n]; none ships because none can be run here.

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

constexpr int64_t kMr = 6;         // rows of the micro-kernel
constexpr int64_t kNr = 16;        // units of the micro-kernel (two ymm of int32)
constexpr int64_t kKcPairs = 128;  // feature pairs per block: a 8 KiB kernel micro-panel
constexpr int64_t kMc = 16 * kMr;  // rows of a tile
constexpr int64_t kNc = 16 * kNr;  // units of a tile
// The packed kernels kept at once; past this the least recently used goes.
constexpr int64_t kCacheBytes = int64_t{1} << 30;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// c[r * ldc + n] (+)= sum_p a[p*kMr + r] · b[p*2*kNr + n] over int16 pairs, for
// r < kMr, n < kNr. `accumulate` false starts from zero.
struct Primitives {
  const char* name;
  void (*micro)(const int32_t* a, const int16_t* b, int64_t pairs, int32_t* c, int64_t ldc,
                bool accumulate);
  // One row: its abs-max (as TensorFlow's reduce_max: -inf for no element).
  float (*abs_max)(const float* x, int64_t k);
  // q[i] = clip(round_half_even(x[i] * scale), -127, 127), i < k.
  void (*quantize)(const float* x, int64_t k, float scale, int16_t* q);
  // out[j] = activation(float(acc[j]) / (kscale[j] * s) + bias[j]), j < cols;
  // bias may be nullptr. Relu is TensorFlow's: a NaN stays NaN.
  void (*epilogue)(const int32_t* acc, int64_t cols, float s, const float* kscale,
                   const float* bias, bool relu, float* out);
};

// ---------------------------------------------------------------------------------
// Portable primitives.

void MicroPortable(const int32_t* a, const int16_t* b, int64_t pairs, int32_t* c, int64_t ldc,
                   bool accumulate) {
  int32_t acc[kMr][kNr];
  for (int64_t r = 0; r < kMr; ++r)
    for (int64_t n = 0; n < kNr; ++n) acc[r][n] = accumulate ? c[r * ldc + n] : 0;
  for (int64_t p = 0; p < pairs; ++p) {
    const int16_t* bp = b + p * 2 * kNr;
    for (int64_t r = 0; r < kMr; ++r) {
      int16_t lo, hi;
      const int32_t word = a[p * kMr + r];
      std::memcpy(&lo, &word, 2);
      std::memcpy(&hi, reinterpret_cast<const char*>(&word) + 2, 2);
      for (int64_t n = 0; n < kNr; ++n) acc[r][n] += int32_t{lo} * bp[2 * n] + int32_t{hi} * bp[2 * n + 1];
    }
  }
  for (int64_t r = 0; r < kMr; ++r)
    for (int64_t n = 0; n < kNr; ++n) c[r * ldc + n] = acc[r][n];
}

float AbsMaxPortable(const float* x, int64_t k) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < k; ++i) peak = std::max(peak, std::fabs(x[i]));
  return peak;
}

void QuantizePortable(const float* x, int64_t k, float scale, int16_t* q) {
  for (int64_t i = 0; i < k; ++i) {
    // nearbyint rounds half to even (the default rounding mode), as tf.round.
    const float r = std::nearbyint(x[i] * scale);
    q[i] = static_cast<int16_t>(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
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

constexpr Primitives kPortable = {"portable", MicroPortable, AbsMaxPortable, QuantizePortable,
                                  EpiloguePortable};

// ---------------------------------------------------------------------------------
// AVX2 primitives.

#ifdef FASTLAYERS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

void MicroAvx2(const int32_t* a, const int16_t* b, int64_t pairs, int32_t* c, int64_t ldc,
               bool accumulate) {
  __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 0 * ldc));
    c01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 0 * ldc + 8));
    c10 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 1 * ldc));
    c11 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 1 * ldc + 8));
    c20 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 2 * ldc));
    c21 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 2 * ldc + 8));
    c30 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 3 * ldc));
    c31 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 3 * ldc + 8));
    c40 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 4 * ldc));
    c41 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 4 * ldc + 8));
    c50 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 5 * ldc));
    c51 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 5 * ldc + 8));
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_si256();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    __m256i w;
    w = _mm256_set1_epi32(a[0]);
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(w, b0));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(w, b1));
    w = _mm256_set1_epi32(a[1]);
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(w, b0));
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(w, b1));
    w = _mm256_set1_epi32(a[2]);
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(w, b0));
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(w, b1));
    w = _mm256_set1_epi32(a[3]);
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(w, b0));
    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(w, b1));
    w = _mm256_set1_epi32(a[4]);
    c40 = _mm256_add_epi32(c40, _mm256_madd_epi16(w, b0));
    c41 = _mm256_add_epi32(c41, _mm256_madd_epi16(w, b1));
    w = _mm256_set1_epi32(a[5]);
    c50 = _mm256_add_epi32(c50, _mm256_madd_epi16(w, b0));
    c51 = _mm256_add_epi32(c51, _mm256_madd_epi16(w, b1));
    a += kMr;
    b += 2 * kNr;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 0 * ldc), c00);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 0 * ldc + 8), c01);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 1 * ldc), c10);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 1 * ldc + 8), c11);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 2 * ldc), c20);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 2 * ldc + 8), c21);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 3 * ldc), c30);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 3 * ldc + 8), c31);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 4 * ldc), c40);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 4 * ldc + 8), c41);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 5 * ldc), c50);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 5 * ldc + 8), c51);
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

void QuantizeAvx2(const float* x, int64_t k, float scale, int16_t* q) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m256 r0 = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r1 = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r0 = _mm256_min_ps(_mm256_max_ps(r0, lo), hi);
    r1 = _mm256_min_ps(_mm256_max_ps(r1, lo), hi);
    // packs works per 128-bit lane: the permute puts the 16 values back in order.
    const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(r0), _mm256_cvtps_epi32(r1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permute4x64_epi64(packed, 0xD8));
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

constexpr Primitives kAvx2 = {"avx2", MicroAvx2, AbsMaxAvx2, QuantizeAvx2, EpilogueAvx2};
#endif  // FASTLAYERS_X86

const Primitives& ChoosePrimitives(const std::string& isa = "best") {
#ifdef FASTLAYERS_X86
  if (UseAvx2(isa)) return kAvx2;
#endif
  return kPortable;
}

// ---------------------------------------------------------------------------------
// The packed-kernel cache.

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

struct PackedKernel {
  const void* address = nullptr;
  int64_t k = 0, n = 0;
  std::vector<int8_t> source;                       // the kernel it was packed from
  std::unique_ptr<int16_t[], AlignedFree> panels;  // [ceil(N/16)][P][16][2]
  int64_t Bytes() const { return static_cast<int64_t>(source.size()) * 3; }
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
    const int64_t pairs = CeilDiv(k, 2), panels = CeilDiv(n, kNr);
    const int64_t elements = std::max<int64_t>(panels * pairs * 2 * kNr, 1);
    const size_t size = static_cast<size_t>(CeilDiv(elements * 2, 64) * 64);
    packed->panels.reset(static_cast<int16_t*>(std::aligned_alloc(64, size)));
    int16_t* out = packed->panels.get();
    auto pack = [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        int16_t* panel = out + j * pairs * 2 * kNr;
        for (int64_t p = 0; p < pairs; ++p) {
          for (int64_t c = 0; c < kNr; ++c) {
            const int64_t col = j * kNr + c;
            for (int64_t h = 0; h < 2; ++h) {
              const int64_t row = 2 * p + h;
              panel[(p * kNr + c) * 2 + h] = (row < k && col < n) ? kernel[row * n + col] : 0;
            }
          }
        }
      }
    };
    tensorflow::Shard(workers.num_threads, workers.workers, panels, pairs * 2 * kNr * 4, pack);
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
    .Attr("isa: {'best', 'portable'} = 'best'")
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

class DenseInt8IsaOp : public OpKernel {
 public:
  explicit DenseInt8IsaOp(OpKernelConstruction* context) : OpKernel(context) {}
  void Compute(OpKernelContext* context) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = ChoosePrimitives().name;
  }
};

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
    primitives_ = &ChoosePrimitives(isa);
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
    const int64_t pairs = CeilDiv(K, 2);
    const int64_t row_panels = CeilDiv(M, kMr);

    std::shared_ptr<const PackedKernel> packed =
        KernelCache::Get().Find(kernel.flat<int8_t>().data(), K, N, workers);

    // Quantize the rows into [row_panels][P][kMr] int16 pairs, padded with zeros.
    Tensor a_tensor, scale_tensor;
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_INT32,
                                                   TensorShape({std::max<int64_t>(row_panels * pairs * kMr, 1)}),
                                                   &a_tensor));
    OP_REQUIRES_OK(context, context->allocate_temp(tensorflow::DT_FLOAT, TensorShape({M}), &scale_tensor));
    int32_t* a_all = a_tensor.flat<int32_t>().data();
    float* scales = scale_tensor.flat<float>().data();
    const float* x_data = x.flat<float>().data();
    const float epsilon = epsilon_;
    auto quantize = [&](int64_t begin, int64_t end) {
      std::vector<int16_t> row(2 * pairs);
      for (int64_t panel = begin; panel < end; ++panel) {
        int32_t* a = a_all + panel * pairs * kMr;
        for (int64_t r = 0; r < kMr; ++r) {
          const int64_t m = panel * kMr + r;
          std::fill(row.begin(), row.end(), 0);
          if (m < M) {
            const float* src = x_data + m * K;
            const float scale = 127.0f / (prim.abs_max(src, K) + epsilon);
            scales[m] = scale;
            prim.quantize(src, K, scale, row.data());
          }
          for (int64_t p = 0; p < pairs; ++p) {
            uint32_t word = static_cast<uint16_t>(row[2 * p]) |
                            (static_cast<uint32_t>(static_cast<uint16_t>(row[2 * p + 1])) << 16);
            std::memcpy(a + p * kMr + r, &word, 4);
          }
        }
      }
    };
    tensorflow::Shard(workers.num_threads, workers.workers, row_panels, kMr * K * 8, quantize);

    const int16_t* b_all = packed->panels.get();
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
        if (pairs == 0) std::fill(c.begin(), c.end(), 0);
        for (int64_t p0 = 0; p0 < pairs; p0 += kKcPairs) {
          const int64_t block = std::min(kKcPairs, pairs - p0);
          for (int64_t jn = 0; jn < panels_n; ++jn) {
            const int16_t* b = b_all + ((n0 / kNr + jn) * pairs + p0) * 2 * kNr;
            for (int64_t im = 0; im < panels_m; ++im) {
              const int32_t* a = a_all + ((m0 / kMr + im) * pairs + p0) * kMr;
              prim.micro(a, b, block, c.data() + im * kMr * ldc + jn * kNr, ldc, p0 > 0);
            }
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
REGISTER_KERNEL_BUILDER(Name("FastlayersDenseInt8Isa").Device(tensorflow::DEVICE_CPU), DenseInt8IsaOp);
REGISTER_KERNEL_BUILDER(Name("FastlayersDenseInt8CachedKernels").Device(tensorflow::DEVICE_CPU),
                        CachedKernelsOp);

}  // namespace int8
}  // namespace fastlayers
