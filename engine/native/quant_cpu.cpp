// Which build of quant_linear.cpp this CPU runs (engine/native/quant_ops.py asks once).
#include <cstdint>

// 2: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) with AVX512-VNNI, 1: x86-64-v3 (AVX2, FMA, BMI1/2), 0: neither.
// Feature by feature: GCC takes "x86-64-v3" / "x86-64-v4" here only from 12 on, and g++ 11 (Ubuntu
// 22.04, RHEL 9) refused the whole build with them, leaving every native kernel off. F16C and MOVBE,
// also in x86-64-v3, come with AVX2 on every x86 CPU and have no name here before GCC 12.
extern "C" int quant_cpu_isa() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
              __builtin_cpu_supports("bmi2");
    bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512vl");
    if (v4 && __builtin_cpu_supports("avx512vnni")) return 2;
    if (v3) return 1;
#endif
    return 0;
}
