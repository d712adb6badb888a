"""The paper rehearsal (`make rehearse`, `python -m rlhf.rehearsal`): every paper config run end to end on CPU.

What cannot exist here is replaced by same-shaped stand-ins and nothing else (rlhf/rehearsal/overlay.py lists every
field it changes): hub datasets by local folders in the real repositories' layouts (hub_fixtures.py), hub models by
small models of the same architecture class and tokenizer behaviour, briefly trained on those folders so their
completions end (standins.py), GPT-4.1-nano and the GSM8K judge by `vllm serve` of a stand-in judge, GPUs by CPU
ranks on a private two-node Slurm cluster (cluster.py). The checks (checks.py) fail a config whose paths ran hollow.
"""
