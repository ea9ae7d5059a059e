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
// several over a byte a weight: 3-4 ms a 768 x 2048 Q4_0 expert on 2 threads, for each of a 30B
// mixture's 12,288 expert matrices).
// q: the file's integers, [out, groups, group / 2] bytes for 4 bits (weight w of a group in byte w % 16,
// low nibble for w < 16, high for the others: groups of 32), [out, groups, group] for 8 bits.
// dst: [tiles, groups, TILE x group (/ 2)] with tiles = ceil(out / 16); rows past `out` are zeros.
// 4 bits: tile byte (c * 16 + lane) * 2 + e = weight 4c + e | weight 4c + 2 + e << 4 of row lane;
// 8 bits: tile byte (c * 16 + lane) * 2 + e = weight 2c + e of row lane.
namespace {

constexpr int TILE = 16;

// One row's group of 32 4-bit weights (16 bytes) into its lane of a tile: bytes o[c * 2 x TILE + e].
// The trip counts are constants, so the loops unroll into straight code with no branch.
inline void tile_row_4bit(const uint8_t* s, uint8_t* o) {
    for (int c = 0; c < 8; c++) {
        for (int e = 0; e < 2; e++) {
            const int lo = 4 * c + e, hi = lo + 2;  // weights of the group, < 32
            const uint8_t wl = c < 4 ? s[lo] & 0x0F : s[lo - 16] >> 4;
            const uint8_t wh = c < 4 ? s[hi] & 0x0F : s[hi - 16] >> 4;
            o[c * 2 * TILE + e] = static_cast<uint8_t>(wl | (wh << 4));
        }
    }
}

// One row's group of G 8-bit weights into its lane: pairs of bytes, a chunk apart.
template <int G>
inline void tile_row_8bit(const uint8_t* s, uint8_t* o) {
    for (int c = 0; c < G / 2; c++) {
        o[c * 2 * TILE] = s[2 * c];
        o[c * 2 * TILE + 1] = s[2 * c + 1];
    }
}

template <int BITS, int G>
void tile_integers(const uint8_t* q, uint8_t* dst, int out, int groups, int threads) {
    constexpr int row_bytes = BITS == 4 ? G / 2 : G;  // a group's bytes in the file, per row
    constexpr int block = TILE * row_bytes;            // a (tile, group)'s bytes in dst
    const int tiles = (out + TILE - 1) / TILE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        for (int g = 0; g < groups; g++) {
            uint8_t* o = dst + (static_cast<std::size_t>(t) * groups + g) * block;
            for (int lane = 0; lane < TILE; lane++) {
                const int row = t * TILE + lane;
                if (row >= out) {  // padding: zero weights in every chunk of this lane
                    for (int c = 0; c < row_bytes / 2; c++) o[c * 2 * TILE + lane * 2] = o[c * 2 * TILE + lane * 2 + 1] = 0;
                    continue;
                }
                const uint8_t* s = q + (static_cast<std::size_t>(row) * groups + g) * row_bytes;
                if constexpr (BITS == 4)
                    tile_row_4bit(s, o + lane * 2);
                else
                    tile_row_8bit<G>(s, o + lane * 2);
            }
        }
    }
}

}  // namespace

extern "C" void quant_tile_integers(const uint8_t* q, uint8_t* dst, int out, int groups, int group, int bits,
                                    int threads) {
    if (bits == 4)  // (4-bit integers come in groups of 32)
        tile_integers<4, 32>(q, dst, out, groups, threads);
    else if (group == 32)
        tile_integers<8, 32>(q, dst, out, groups, threads);
    else
        tile_integers<8, 16>(q, dst, out, groups, threads);
}
