"""skipserve engine: scheduler, KV cache, model runner and the FFN-skip policies."""
