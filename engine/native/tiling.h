// How the GEMM kernels (linear.cpp, linear_bf16.cpp) split their work: output blocks over the
// OpenMP team, rows into register tiles. The kernels are templates on their row count R (so the
// accumulators live in registers); `for_row_tiles` turns a runtime count into that argument.
#pragma once
#include <type_traits>

#include "work_chunks.h"

constexpr int BLOCK = 16;    // outputs per weight block (engine/native/ops.py: block_weight)
constexpr int ROW_TILE = 6;  // 2 blocks x 2 chains x 6 rows = 24 accumulators of the 32 registers

// Calls task(first_block, pair) for every task, in chunks over `threads` (work_chunks.h): one block per
// task for one or two rows (memory-bound), pairs of blocks for more (compute-bound: each
// broadcast of x feeds two FMAs); `pair` is false for a task with a single block left.
template <typename Task>
inline void for_block_tasks(int blocks, int rows, int threads, Task&& task) {
    const int per_task = rows <= 2 ? 1 : 2;
    const int tasks = (blocks + per_task - 1) / per_task;
#pragma omp parallel for schedule(dynamic, work_chunk(tasks, threads)) num_threads(threads)
    for (int t = 0; t < tasks; ++t) {
        const int b = t * per_task;
        task(b, per_task == 2 && blocks - b >= 2);
    }
}

// Calls tile(first_row, std::integral_constant<int, R>{}) for rows [0, rows) in tiles of at most
// MAX_TILE (ROW_TILE for AVX-512's 32 registers; AVX2 kernels pass a smaller one for their 16).
template <int MAX_TILE = ROW_TILE, typename Tile>
inline void for_row_tiles(int rows, Tile&& tile) {
    static_assert(MAX_TILE >= 1 && MAX_TILE <= 6, "tiles of 1 to 6 rows");
    for (int r = 0; r < rows; r += MAX_TILE) {
        switch (rows - r < MAX_TILE ? rows - r : MAX_TILE) {
            case 1: tile(r, std::integral_constant<int, 1>{}); break;
            case 2: tile(r, std::integral_constant<int, 2>{}); break;
            case 3: tile(r, std::integral_constant<int, 3>{}); break;
            case 4: tile(r, std::integral_constant<int, 4>{}); break;
            case 5: tile(r, std::integral_constant<int, 5>{}); break;
            case 6: tile(r, std::integral_constant<int, 6>{}); break;
        }
    }
}
