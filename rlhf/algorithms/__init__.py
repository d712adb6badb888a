"""Pure tensor functions of the papers' algorithms, importable by any trainer."""
