"""Product benchmarks: each script measures one part of sedvae; its last line is JSON."""
