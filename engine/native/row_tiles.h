// Row tiling shared by the GEMM kernels: the kernels are templates on their row count R (so the
// accumulators live in registers), and this turns a runtime count into that template argument.
#pragma once
#include <type_traits>

constexpr int ROW_TILE = 6;  // 2 blocks x 2 chains x 6 rows = 24 accumulators of the 32 registers

// Calls tile(first_row, std::integral_constant<int, R>{}) for rows [0, rows) in tiles of at most ROW_TILE.
template <typename Tile>
inline void for_row_tiles(int rows, Tile&& tile) {
    for (int r = 0; r < rows; r += ROW_TILE) {
        switch (rows - r < ROW_TILE ? rows - r : ROW_TILE) {
            case 1: tile(r, std::integral_constant<int, 1>{}); break;
            case 2: tile(r, std::integral_constant<int, 2>{}); break;
            case 3: tile(r, std::integral_constant<int, 3>{}); break;
            case 4: tile(r, std::integral_constant<int, 4>{}); break;
            case 5: tile(r, std::integral_constant<int, 5>{}); break;
            case 6: tile(r, std::integral_constant<int, 6>{}); break;
        }
    }
}
