// The run-time ISA choice every native source makes: each ships its primitives as a
// portable version and an AVX2+FMA one (compiled with a per-function target, so the
// library runs on any x86-64) and takes the second where the CPU has it.

#ifndef FASTLAYERS_NATIVE_ISA_H_
#define FASTLAYERS_NATIVE_ISA_H_

#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTLAYERS_X86 1
#endif

namespace fastlayers {

// Whether to run the AVX2+FMA primitives: the CPU reports both and the op's `isa`
// attribute is not "portable" (tests compare the two versions through it).
inline bool UseAvx2(const std::string& isa) {
  if (isa == "portable") return false;
#ifdef FASTLAYERS_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace fastlayers

#endif  // FASTLAYERS_NATIVE_ISA_H_
