"""What runs while a compiled graph runs: the prefetch runtime of each offloaded ModuleList
(`prefetcher`) with its copy ordering (`event_order`, `counter_order` and `counter_device`)
and slot buffers (`slots`), the registry the custom ops find them in (`registry`), the staging
of CUDA-graph inputs (`staging`) and UVA's fetcher (`uva_fetcher`)."""
