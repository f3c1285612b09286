"""`hypo plan`: the peak memory of a run per GPU, by part, before launch."""
