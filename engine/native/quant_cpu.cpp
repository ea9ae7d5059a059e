// Which build of quant_linear.cpp this CPU runs (engine/native/quant_ops.py asks once).
#include <cstdint>

// 2: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) with AVX512-VNNI, 1: x86-64-v3 (AVX2, FMA, F16C, BMI), 0: neither.
extern "C" int quant_cpu_isa() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vnni")) return 2;
    if (__builtin_cpu_supports("x86-64-v3")) return 1;
#endif
    return 0;
}
