// The run-time ISA choice every native source makes: each ships its primitives as
// tables, one per ISA (a portable one, an AVX2+FMA one, and for some an AVX-512
// one), each compiled with a per-function target so the library runs on any x86-64,
// and takes the best the CPU runs.
//
// An op's `isa` attribute names the table to run: "best" (the default), or one by
// name, which tests use to compare them; a table the CPU cannot run is an error.
//
// A source's AVX-512 primitives sit between FASTLAYERS_AVX512_BEGIN and
// FASTLAYERS_AVX512_END; those that also use AVX512-BF16 or AVX512-VNNI between
// FASTLAYERS_AVX512_BF16_BEGIN / _END or FASTLAYERS_AVX512VNNI_BEGIN / _END, targets of
// their own, so the compiler never puts those instructions into code that an AVX-512
// CPU without them runs. Built with -DFASTLAYERS_EMULATE_AVX512 (and SIMDe's headers
// on the include path), the same intrinsics compile to SIMDe's portable versions and
// every CPU "runs" them: the tests run the AVX-512 primitives that way on CPUs
// without AVX-512. SIMDe implements a subset of the intrinsics; the AVX-512 code
// keeps to it (no _mm512_reduce_add_ps, no _mm512_cvtepu8_epi32, no
// _mm512_cvtne2ps_pbh).

#ifndef FASTLAYERS_NATIVE_ISA_H_
#define FASTLAYERS_NATIVE_ISA_H_

#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTLAYERS_X86 1
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
#endif

namespace fastlayers {

// Whether this CPU runs the primitives of `isa`: "portable" everywhere, "avx2" where
// it reports AVX2 and FMA, "avx512" where it reports AVX-512 F, BW, DQ and VL, and
// "avx512bf16" or "avx512vnni" where it reports those and AVX512-BF16 or AVX512-VNNI
// (all of them in an emulated build).
inline bool CpuRuns(const std::string& isa) {
  if (isa == "portable") return true;
#ifdef FASTLAYERS_X86
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512" || isa == "avx512bf16" || isa == "avx512vnni") {
#ifdef FASTLAYERS_EMULATE_AVX512
    return true;
#else
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (isa == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
    if (isa == "avx512vnni") return avx512 && __builtin_cpu_supports("avx512vnni");
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

}  // namespace fastlayers

#endif  // FASTLAYERS_NATIVE_ISA_H_
