"""Reward hacking in RLHF/RLVR: the pipeline's package. See README.md."""
