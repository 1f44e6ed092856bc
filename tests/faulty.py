"""iqstar.py with faults injected at given calls, for the tests of runs that survive.

IQSTAR_FAULTS is JSON, e.g. {"nan_loss": [2], "nan_grad": [4], "nan_loss_from": 1, "sigterm_train": 8,
"sigterm_sample": 3, "rank": 1}: numbers count calls of lean_policy_loss (one per training step) or sample_responses
(one per rollout batch) from the start of this process.
"""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iqstar  # noqa: E402

faults = json.loads(os.environ.get("IQSTAR_FAULTS", "{}"))
if "rank" in faults and int(os.environ.get("RANK", 0)) != faults["rank"]:  # {"rank": 1, ...}: on that rank only
    faults = {}
calls = {"train": 0, "sample": 0}
policy_loss, sample_responses = iqstar.lean_policy_loss, iqstar.sample_responses  # what the loop calls


def faulty_policy_loss(*args, **kwargs):
    calls["train"] += 1
    n = calls["train"]
    loss, credit, mask = policy_loss(*args, **kwargs)
    if n in faults.get("nan_loss", []) or n >= faults.get("nan_loss_from", float("inf")):
        loss = loss * float("nan")
    if n in faults.get("nan_grad", []):
        loss = loss + torch.sqrt(loss * 0) * 0  # still the same finite value, but every gradient is NaN
    if n == faults.get("sigterm_train"):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while this step runs; the loop finishes the step
    return loss, credit, mask


def faulty_sample_responses(*args, **kwargs):
    calls["sample"] += 1
    if calls["sample"] == faults.get("sigterm_sample"):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before generate() starts: it must end the batch early
    return sample_responses(*args, **kwargs)


iqstar.lean_policy_loss, iqstar.sample_responses = faulty_policy_loss, faulty_sample_responses
iqstar.main()
