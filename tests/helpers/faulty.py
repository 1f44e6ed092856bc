"""iqstar.py with faults injected at given calls, for the tests of runs that survive.

IQSTAR_FAULTS is JSON, e.g. {"nan_loss": [2], "nan_grad": [4], "nan_loss_from": 7, "signal_train": 8,
"signal_sample": 3, "signal": "SIGINT", "rank": 1}: numbers count calls of iqstar_loss (one per training step) or
sample_responses (one per rollout batch) from the start of this process; the signal is SIGTERM unless named.
{"record": PATH} writes PATH at the end: "sampled", [prompts, responses] of each generate() call, and "trained",
[prompts, responses] of each step's superior_targets call (plain prompts).
"""

import atexit
import json
import os
import signal

import torch

import iqstar

faults = json.loads(os.environ.get("IQSTAR_FAULTS", "{}"))
if "rank" in faults and int(os.environ.get("RANK", 0)) != faults["rank"]:  # {"rank": 1, ...}: on that rank only
    faults = {}
calls = {"train": 0, "sample": 0}
signum = getattr(signal, faults.get("signal", "SIGTERM"))
iqstar_loss, sample_responses = iqstar.iqstar_loss, iqstar.sample_responses  # what the loop calls
superior_targets, record = iqstar.superior_targets, {"sampled": [], "trained": []}


def faulty_loss(*args, **kwargs):
    calls["train"] += 1
    n = calls["train"]
    loss = iqstar_loss(*args, **kwargs)
    if n in faults.get("nan_loss", []) or n >= faults.get("nan_loss_from", float("inf")):
        loss = loss * float("nan")
    if n in faults.get("nan_grad", []):
        loss = loss + torch.sqrt(loss * 0) * 0  # still the same finite value, but every gradient is NaN
    if n == faults.get("signal_train"):
        os.kill(os.getpid(), signum)  # a real signal, raised as Stopped in the loop (not in this function)
    return loss


def faulty_sample_responses(*args, **kwargs):
    calls["sample"] += 1
    if calls["sample"] == faults.get("signal_sample"):
        os.kill(os.getpid(), signum)
    responses = sample_responses(*args, **kwargs)
    record["sampled"].append([args[1], responses])
    return responses


def recording_superior_targets(*args, **kwargs):
    record["trained"].append([args[3], args[4]])
    return superior_targets(*args, **kwargs)


if "record" in faults:
    atexit.register(lambda: json.dump(record, open(faults["record"], "w")))


iqstar.iqstar_loss, iqstar.sample_responses = faulty_loss, faulty_sample_responses
iqstar.superior_targets = recording_superior_targets
iqstar.main()
