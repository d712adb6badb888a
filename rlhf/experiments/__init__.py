"""Small self-contained experiments from the papers, run with the pipeline's algorithm functions."""
