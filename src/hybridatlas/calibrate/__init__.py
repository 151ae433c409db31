"""Round trips per operation from measurement: real clients against real stores over an emulated WAN
(stores.py, probe.py), and from traces measured under a placement (traces.py)."""
