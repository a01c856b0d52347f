"""Pure tensor mathematics (no files, no models): so(b) merging, Cayley maps, Procrustes, Euclidean merges."""
