"""One module per pipeline stage; each exposes `run(cfg, args)` and is called by `python -m rlhf <stage>`."""
