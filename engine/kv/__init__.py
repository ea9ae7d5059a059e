"""The paged KV cache: block allocation and prefix caching (integers, `block_manager`), how many
blocks fit (`capacity`), the tensors (`cache`) and the per-step metadata the runner builds
(`metadata`)."""
