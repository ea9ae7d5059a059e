// Quantized weights on the CPU: which build of quant_linear.cpp this CPU runs (engine/native/quant_ops.py
// asks once), and the tiling of the integers at load (engine/quant/tiled.py).
#include <cstddef>
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

// engine/quant/tiled.py's layout of a quantized matrix, written in one pass (the torch version takes
// several over a byte a weight: 3-4 ms a 768 x 2048 Q4_0 expert on 2 threads, against about 1 ms here,
// for each of a 30B mixture's 12,288 expert matrices).
// q: the file's integers, [out, groups, group / 2] bytes for 4 bits (weight w of a group in byte w % 16,
// low nibble for w < 16, high for the others: groups of 32), [out, groups, group] for 8 bits.
// dst: [tiles, groups, TILE x group (/ 2)] with tiles = ceil(out / 16); rows past `out` are zeros.
// 4 bits: tile byte (c * 16 + lane) * 2 + e = weight 4c + e | weight 4c + 2 + e << 4 of row lane;
// 8 bits: tile byte (c * 16 + lane) * 2 + e = weight 2c + e of row lane.
extern "C" void quant_tile_integers(const uint8_t* q, uint8_t* dst, int out, int groups, int group, int bits,
                                    int threads) {
    const int tile = 16, tiles = (out + tile - 1) / tile;
    const int row_bytes = bits == 4 ? group / 2 : group;  // a group's bytes in the file, per row
    const int block = tile * row_bytes;                    // a (tile, group)'s bytes in dst
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        for (int g = 0; g < groups; g++) {
            uint8_t* o = dst + ((std::size_t)t * groups + g) * block;
            for (int lane = 0; lane < tile; lane++) {
                const int row = t * tile + lane;
                const uint8_t* s = row < out ? q + ((std::size_t)row * groups + g) * row_bytes : nullptr;
                if (bits == 4) {
                    for (int c = 0; c < group / 4; c++) {
                        for (int e = 0; e < 2; e++) {
                            uint8_t v = 0;
                            if (s) {
                                int lo = 4 * c + e, hi = 4 * c + 2 + e;  // weights of the group, < 32
                                uint8_t wl = lo < 16 ? s[lo] & 0x0F : s[lo - 16] >> 4;
                                uint8_t wh = hi < 16 ? s[hi] & 0x0F : s[hi - 16] >> 4;
                                v = (uint8_t)(wl | (wh << 4));
                            }
                            o[(c * tile + lane) * 2 + e] = v;
                        }
                    }
                } else {
                    for (int c = 0; c < group / 2; c++)
                        for (int e = 0; e < 2; e++)
                            o[(c * tile + lane) * 2 + e] = s ? s[2 * c + e] : 0;
                }
            }
        }
    }
}
