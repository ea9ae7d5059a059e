// How the GEMM kernels hand their work to the OpenMP team: in chunks, to whichever thread is
// free (`schedule(dynamic, work_chunk(...))`), about CHUNKS_PER_THREAD of them a thread. A server's
// other threads (HTTP, tokenizer, the benchmark client on the same host) take a core from the
// team now and then; with a static split the whole team waits for the thread they displaced.
// Measured with bench/serve.py at 16 clients, the quantized kernel's static split against this,
// in one run: 1.21x output tok/s on AVX-512, 1.15x on the AVX2 build.
#pragma once

constexpr int CHUNKS_PER_THREAD = 8;

inline int work_chunk(int items, int threads) {
    const int chunk = items / (threads * CHUNKS_PER_THREAD);
    return chunk > 1 ? chunk : 1;
}
