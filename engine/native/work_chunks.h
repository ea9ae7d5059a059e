// How the GEMM kernels hand their work to the OpenMP team: in chunks, to whichever thread is
// free (`schedule(dynamic, work_chunk(...))`), about CHUNKS_PER_THREAD of them a thread. A server's
// other threads (HTTP, tokenizer, the benchmark client on the same host) take a core from the
// team now and then; with a static split the whole team waits for the thread they displaced.
// Measured with bench/serve.py at 16 clients, the quantized kernel's static split against this,
// in one run: 1.21x output tok/s on AVX-512, 1.15x on the AVX2 build.
//
// A product of one or two rows is bound by reading its weights, and every chunk a thread takes
// starts a new stream that the prefetchers pick up again: such products go in STREAM_CHUNKS a
// thread, longer (quant_linear.cpp; the README's "Quantized weights" has the measurements).
#pragma once

constexpr int CHUNKS_PER_THREAD = 8;
constexpr int STREAM_ROWS = 2;     // rows up to which a product streams its weights
constexpr int STREAM_CHUNKS = 2;   // chunks a thread for those

inline int work_chunk(int items, int threads, int per_thread = CHUNKS_PER_THREAD) {
    const int chunk = items / (threads * per_thread);
    return chunk > 1 ? chunk : 1;
}
