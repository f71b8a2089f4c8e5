// The run-time ISA choice every native source makes: each ships its primitives as
// tables, one per ISA (a portable one, an AVX2+FMA one, and for some an AVX-512
// one), each compiled with a per-function target so the library runs on any x86-64,
// and takes the best the CPU runs.
//
// An op's `isa` attribute names the table to run: "best" (the default), or one by
// name, which tests use to compare them; a table the CPU cannot run is an error.
//
// A source's AVX-512 primitives sit between FASTLAYERS_AVX512_BEGIN and
// FASTLAYERS_AVX512_END; those that also use AVX512-BF16, AVX512-VNNI or AMX between
// FASTLAYERS_AVX512_BF16_BEGIN, FASTLAYERS_AVX512VNNI_BEGIN or FASTLAYERS_AMX_BEGIN and
// the _END of each, targets of their own, so the compiler never puts those
// instructions into code that a CPU without them runs. Built with
// -DFASTLAYERS_EMULATE_AVX512 (and SIMDe's headers on the include path), the same
// intrinsics compile to SIMDe's portable versions (AMX's to amx_emulation below) and
// every CPU "runs" them: the tests run the AVX-512 and AMX primitives that way on
// CPUs without them. SIMDe implements a subset of the intrinsics; the AVX-512 code
// keeps to it (no _mm512_reduce_add_ps, no _mm512_cvtepu8_epi32, no
// _mm512_cvtne2ps_pbh).

#ifndef FASTLAYERS_NATIVE_ISA_H_
#define FASTLAYERS_NATIVE_ISA_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTLAYERS_X86 1
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(FASTLAYERS_X86) && defined(FASTLAYERS_EMULATE_AVX512)
// The function names of the AVX-512 intrinsics become SIMDe's; the vector types are
// renamed below (SIMDe's own type aliases would clash with immintrin.h's).
#define SIMDE_X86_AVX512F_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512BW_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512DQ_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512VL_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512VNNI_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512BF16_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define FASTLAYERS_AVX512_BEGIN
#define FASTLAYERS_AVX512_END
#define FASTLAYERS_AVX512_BF16_BEGIN
#define FASTLAYERS_AVX512_BF16_END
#define FASTLAYERS_AVX512VNNI_BEGIN
#define FASTLAYERS_AVX512VNNI_END
#define FASTLAYERS_AMX_BEGIN
#define FASTLAYERS_AMX_END
#define __m512 simde__m512
#define __m512i simde__m512i
#define __m512bh simde__m512bh
#elif defined(FASTLAYERS_X86)
#define FASTLAYERS_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma\")")
#define FASTLAYERS_AVX512_END _Pragma("GCC pop_options")
#define FASTLAYERS_AVX512_BF16_BEGIN \
  _Pragma("GCC push_options")       \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma\")")
#define FASTLAYERS_AVX512_BF16_END _Pragma("GCC pop_options")
#define FASTLAYERS_AVX512VNNI_BEGIN  \
  _Pragma("GCC push_options")        \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma\")")
#define FASTLAYERS_AVX512VNNI_END _Pragma("GCC pop_options")
#define FASTLAYERS_AMX_BEGIN       \
  _Pragma("GCC push_options")      \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16,avx2,fma\")")
#define FASTLAYERS_AMX_END _Pragma("GCC pop_options")
#endif

namespace fastlayers {

#if defined(FASTLAYERS_X86) && defined(FASTLAYERS_EMULATE_AVX512)
// The AMX tile instructions the native sources use, as plain loops on a per-thread
// tile file (SIMDe has no AMX): tiles as the configuration shapes them, a load
// zeroing what a row or a tile leaves out, TDPBF16PS's pairs of bfloat16 products
// added to float32.
namespace amx_emulation {

struct Tiles {
  uint8_t config[64] = {};
  alignas(64) uint8_t data[8][1024] = {};
  int Rows(int t) const { return config[48 + t]; }
  int Bytes(int t) const { return config[16 + 2 * t] | (config[17 + 2 * t] << 8); }
};

inline Tiles& State() {
  static thread_local Tiles tiles;
  return tiles;
}

inline void LoadConfig(const void* config) {
  std::memcpy(State().config, config, 64);
  std::memset(State().data, 0, sizeof(State().data));  // as ldtilecfg zeroes the tiles
}

inline void Release() {
  std::memset(State().config, 0, 64);
  std::memset(State().data, 0, sizeof(State().data));
}

inline void Load(int t, const void* base, long stride) {
  Tiles& tiles = State();
  std::memset(tiles.data[t], 0, 1024);
  for (int r = 0; r < tiles.Rows(t); ++r) {
    std::memcpy(tiles.data[t] + 64 * r, static_cast<const uint8_t*>(base) + r * stride, tiles.Bytes(t));
  }
}

inline void Store(int t, void* base, long stride) {
  const Tiles& tiles = State();
  for (int r = 0; r < tiles.Rows(t); ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.data[t] + 64 * r, tiles.Bytes(t));
  }
}

inline float Bf16(const uint8_t* x) {
  const uint32_t bits = static_cast<uint32_t>(x[0] | (x[1] << 8)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void DpBf16(int c, int a, int b) {
  Tiles& tiles = State();
  for (int m = 0; m < tiles.Rows(c); ++m) {
    for (int n = 0; n < tiles.Bytes(c) / 4; ++n) {
      float acc;
      std::memcpy(&acc, tiles.data[c] + 64 * m + 4 * n, sizeof(acc));
      for (int k = 0; k < tiles.Bytes(a) / 4; ++k) {
        const uint8_t* x = tiles.data[a] + 64 * m + 4 * k;
        const uint8_t* y = tiles.data[b] + 64 * k + 4 * n;
        acc += Bf16(x) * Bf16(y) + Bf16(x + 2) * Bf16(y + 2);
      }
      std::memcpy(tiles.data[c] + 64 * m + 4 * n, &acc, sizeof(acc));
    }
  }
}

}  // namespace amx_emulation

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) ::fastlayers::amx_emulation::LoadConfig(config)
#define _tile_release() ::fastlayers::amx_emulation::Release()
#define _tile_loadd(t, base, stride) ::fastlayers::amx_emulation::Load(t, base, stride)
#define _tile_stored(t, base, stride) ::fastlayers::amx_emulation::Store(t, base, stride)
#define _tile_zero(t) std::memset(::fastlayers::amx_emulation::State().data[t], 0, 1024)
#define _tile_dpbf16ps(c, a, b) ::fastlayers::amx_emulation::DpBf16(c, a, b)
#endif

// Whether this process may use AMX's tile data: Linux hands it out on request
// (arch_prctl ARCH_REQ_XCOMP_PERM), once per process.
inline bool AmxPermitted() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool permitted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
#else
  return false;
#endif
}

// Whether this CPU runs the primitives of `isa`: "portable" everywhere, "avx2" where
// it reports AVX2 and FMA, "avx512" where it reports AVX-512 F, BW, DQ and VL,
// "avx512bf16" or "avx512vnni" where it reports those and AVX512-BF16 or AVX512-VNNI,
// "amx" where it reports AVX512-BF16, AMX-TILE and AMX-BF16 and Linux grants the
// tile data (all of them in an emulated build, AMX's through amx_emulation).
inline bool CpuRuns(const std::string& isa) {
  if (isa == "portable") return true;
#ifdef FASTLAYERS_X86
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512" || isa == "avx512bf16" || isa == "avx512vnni" || isa == "amx") {
#ifdef FASTLAYERS_EMULATE_AVX512
    return true;
#else
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (isa == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
    if (isa == "avx512vnni") return avx512 && __builtin_cpu_supports("avx512vnni");
    if (isa == "amx") {
      return avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-bf16") && AmxPermitted();
    }
    return avx512;
#endif
  }
#endif
  return false;
}

// The table an op runs for its `isa` attribute: with "best", the first of `tables`
// (best first, each with a `name`) the CPU runs; with a name, that table, or nullptr
// when the CPU does not run it (IsaError says so).
template <typename Table, int N>
const Table* ChooseIsa(const Table* const (&tables)[N], const std::string& isa) {
  for (const Table* table : tables) {
    if ((isa == "best" || isa == table->name) && CpuRuns(table->name)) return table;
  }
  return nullptr;
}

template <typename Table, int N>
std::string IsaError(const Table* const (&tables)[N], const std::string& isa) {
  return "isa='" + isa + "' needs a CPU that runs it; this one runs '" +
         ChooseIsa(tables, "best")->name + "' at best";
}

// The op that names the table of `kTables` "best" picks on this CPU (FastlayersNativeIsa,
// FastlayersDenseInt8Isa): a string scalar.
template <const auto& kTables>
class BestIsaOp : public tensorflow::OpKernel {
 public:
  explicit BestIsaOp(tensorflow::OpKernelConstruction* context) : OpKernel(context) {}
  void Compute(tensorflow::OpKernelContext* context) override {
    tensorflow::Tensor* out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, tensorflow::TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = ChooseIsa(kTables, "best")->name;
  }
};

}  // namespace fastlayers

#endif  // FASTLAYERS_NATIVE_ISA_H_
