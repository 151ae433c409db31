"""Atlas's own ground truth: a small traced microservice application run on-prem, in the cloud and
split between them over an emulated WAN (see run.py)."""
