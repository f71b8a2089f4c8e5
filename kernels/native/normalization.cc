// Layer normalization and RMS normalization over the last axis, one pass per row.
//
// Shape letters: R rows, D the normalized (last) axis. x [R, D] in T; gamma [D] or
// [0] (no scale) and beta [D] or [0] (no offset), float32; y [R, D] in T.
//
// The semantics are those of fastlayers.kernels.normalization's references, with the
// statistics in float32:
//   centered (LayerNormalization): mean = Σx/D, var = Σ(x - mean)²/D;
//   otherwise (RMSNormalization):  mean = 0,    var = Σx²/D;
//   y = (x - (subtract_mean ? mean : 0)) · rsqrt(var + epsilon) · gamma + beta.
// LayerNormalization's deprecated rms_scaling is centered without subtract_mean.
//
// Why native: XLA's CPU code reads each row twice from memory (a reduction fusion,
// then the element-wise one) and TensorFlow's graph runs a separate op per step.
// Here a worker reads a row (D floats fit L1) once from memory, makes the two
// statistics passes and the output pass in L1, and writes the row once. A bfloat16
// or float16 row is widened into a per-shard float32 buffer first.
//
// ISA dispatch as in attention.cc (isa.h): the row primitives come as a portable
// version and an AVX2+FMA one, chosen at run time.

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

#include "isa.h"

namespace fastlayers {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
namespace errors = tensorflow::errors;

// One row's statistics and output, on a float32 row x[0..D).
struct RowPrimitives {
  const char* name;
  float (*sum)(const float* x, int64_t d);
  float (*sum_squares)(const float* x, int64_t d, float shift);
  // y = (x - shift) * scale * gamma + beta; gamma/beta may be null.
  void (*apply)(const float* x, int64_t d, float shift, float scale, const float* gamma,
                const float* beta, float* y);
};

// Portable primitives: four accumulators, so the compiler may keep them in registers
// and the summation order matches the AVX2 version's lanes only loosely (both are
// float32 sums of D terms; the tests hold both to the float32 tolerance).
float SumPortable(const float* x, int64_t d) {
  float acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4)
    for (int k = 0; k < 4; ++k) acc[k] += x[i + k];
  for (; i < d; ++i) acc[0] += x[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

float SumSquaresPortable(const float* x, int64_t d, float shift) {
  float acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4)
    for (int k = 0; k < 4; ++k) {
      const float v = x[i + k] - shift;
      acc[k] += v * v;
    }
  for (; i < d; ++i) {
    const float v = x[i] - shift;
    acc[0] += v * v;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

void ApplyPortable(const float* x, int64_t d, float shift, float scale, const float* gamma,
                   const float* beta, float* y) {
  for (int64_t i = 0; i < d; ++i) {
    float v = (x[i] - shift) * scale;
    if (gamma != nullptr) v *= gamma[i];
    if (beta != nullptr) v += beta[i];
    y[i] = v;
  }
}

constexpr RowPrimitives kPortable = {"portable", SumPortable, SumSquaresPortable, ApplyPortable};

#ifdef FASTLAYERS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four independent 8-lane accumulators hide the add latency.
float SumAvx2(const float* x, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
  float total = HorizontalSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < d; ++i) total += x[i];
  return total;
}

float SumSquaresAvx2(const float* x, int64_t d, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), s);
    const __m256 v1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), s);
    const __m256 v2 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 16), s);
    const __m256 v3 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 24), s);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), s);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  float total = HorizontalSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < d; ++i) total += (x[i] - shift) * (x[i] - shift);
  return total;
}

void ApplyAvx2(const float* x, int64_t d, float shift, float scale, const float* gamma,
               const float* beta, float* y) {
  const __m256 s = _mm256_set1_ps(shift), r = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), s), r);
    if (gamma != nullptr) v = _mm256_mul_ps(v, _mm256_loadu_ps(gamma + i));
    if (beta != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(beta + i));
    _mm256_storeu_ps(y + i, v);
  }
  for (; i < d; ++i) {
    float v = (x[i] - shift) * scale;
    if (gamma != nullptr) v *= gamma[i];
    if (beta != nullptr) v += beta[i];
    y[i] = v;
  }
}

#pragma GCC pop_options

constexpr RowPrimitives kAvx2 = {"avx2", SumAvx2, SumSquaresAvx2, ApplyAvx2};
constexpr const RowPrimitives* kTables[] = {&kAvx2, &kPortable};
#else
constexpr const RowPrimitives* kTables[] = {&kPortable};
#endif  // FASTLAYERS_X86

REGISTER_OP("FastlayersNormalization")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("epsilon: float")
    .Attr("centered: bool")
    .Attr("subtract_mean: bool")
    .Attr("isa: {'best', 'avx2', 'portable'} = 'best'")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      c->set_output(0, x);
      return absl::OkStatus();
    });

template <typename T>
class NormalizationOp : public OpKernel {
 public:
  explicit NormalizationOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string isa;
    OP_REQUIRES_OK(context, context->GetAttr("isa", &isa));
    primitives_ = ChooseIsa(kTables, isa);
    OP_REQUIRES(context, primitives_ != nullptr, errors::InvalidArgument(IsaError(kTables, isa)));
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(context, context->GetAttr("centered", &centered_));
    OP_REQUIRES_OK(context, context->GetAttr("subtract_mean", &subtract_mean_));
    OP_REQUIRES(context, epsilon_ >= 0.0f && std::isfinite(epsilon_),
                errors::InvalidArgument("epsilon must be a non-negative number. Received: epsilon=",
                                        epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& gamma = context->input(1);
    const Tensor& beta = context->input(2);
    OP_REQUIRES(context, x.dims() == 2,
                errors::InvalidArgument("x must have rank 2 [R, D]. Received: x.shape=",
                                        x.shape().DebugString()));
    const int64_t R = x.dim_size(0), D = x.dim_size(1);
    for (const auto& [name, weight] : {std::pair<const char*, const Tensor&>{"gamma", gamma},
                                       std::pair<const char*, const Tensor&>{"beta", beta}}) {
      OP_REQUIRES(context, weight.dims() == 1 && (weight.dim_size(0) == 0 || weight.dim_size(0) == D),
                  errors::InvalidArgument(name, " must have shape [0] (absent) or [D] = [", D,
                                          "]. Received: ", name, ".shape=", weight.shape().DebugString()));
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y));
    if (R == 0 || D == 0) return;

    const T* in = x.flat<T>().data();
    T* out = y->flat<T>().data();
    const float* g = gamma.NumElements() ? gamma.flat<float>().data() : nullptr;
    const float* b = beta.NumElements() ? beta.flat<float>().data() : nullptr;
    const RowPrimitives& p = *primitives_;
    const float epsilon = epsilon_;
    const bool centered = centered_, subtract_mean = subtract_mean_;
    const float inverse_d = 1.0f / static_cast<float>(D);

    auto rows = [&](int64_t begin, int64_t end) {
      // Narrow types are widened into (and written back from) float32 buffers.
      std::vector<float> widened(std::is_same<T, float>::value ? 0 : 2 * D);
      for (int64_t r = begin; r < end; ++r) {
        const float* row;
        float* dst;
        if constexpr (std::is_same<T, float>::value) {
          row = in + r * D;
          dst = out + r * D;
        } else {
          const T* src = in + r * D;
          for (int64_t i = 0; i < D; ++i) widened[i] = static_cast<float>(src[i]);
          row = widened.data();
          dst = widened.data() + D;
        }
        const float mean = centered ? p.sum(row, D) * inverse_d : 0.0f;
        const float variance = p.sum_squares(row, D, mean) * inverse_d;
        const float scale = 1.0f / std::sqrt(variance + epsilon);
        p.apply(row, D, subtract_mean ? mean : 0.0f, scale, g, b, dst);
        if constexpr (!std::is_same<T, float>::value) {
          T* narrow = out + r * D;
          for (int64_t i = 0; i < D; ++i) narrow[i] = static_cast<T>(dst[i]);
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // Cost per row: about five operations per element (sum, square-sum, output).
    tensorflow::Shard(workers->num_threads, workers->workers, R, 5 * D, rows);
  }

 private:
  const RowPrimitives* primitives_;
  float epsilon_;
  bool centered_;
  bool subtract_mean_;
};

#define FASTLAYERS_REGISTER(type)                                                              \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("FastlayersNormalization").Device(tensorflow::DEVICE_CPU).TypeConstraint<type>("T"), \
      NormalizationOp<type>)
FASTLAYERS_REGISTER(float);
FASTLAYERS_REGISTER(Eigen::half);
FASTLAYERS_REGISTER(Eigen::bfloat16);
#undef FASTLAYERS_REGISTER

}  // namespace
}  // namespace fastlayers
