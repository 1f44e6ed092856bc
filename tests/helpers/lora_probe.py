"""iqstar.py with LoRA, probed at its first and last step, for tests/test_lora.py.

`python tests/helpers/lora_probe.py PROBE.pt OUT.pt IQSTAR-FLAGS...` (or under `deepspeed`) runs iqstar.py as it
is and, on every rank (a ZeRO-3 forward is a collective), scores PROBE.pt's fixed batch ("prompts", "principled",
"responses", "alpha", "pad") with iqstar's own functions: right after π_θ ← μ (LoRA's B = 0) and before the policy
is saved at the end. For each, rank 0 writes to OUT.pt: "policy", log π_θ(y_t) of the policy; "base", the same with
the adapter disabled; "targets", log π̂(y_t) as the run scores them (its reference model, the adapter off when that is
the policy). And "frozen_copies": how many frozen models the run loaded (load_frozen calls).
"""

import sys

import torch

import iqstar

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's; LOCAL_RANK says it too
probe, out_path = torch.load(argv[0]), argv[1]
report = {"frozen_copies": 0}


def score(run, when):
    """The probe's log-probs by the run's models now, in eval mode and without gradients, as scoring is."""
    args = (probe["prompts"], probe["responses"], probe["pad"], run.device)
    run.engine.eval()
    with torch.no_grad():
        policy, mask = iqstar.policy_logprobs(run.engine, *args)
        with run.engine.module.disable_adapter():
            base, _ = iqstar.policy_logprobs(run.engine, *args)
        targets = iqstar.score_epoch(run, [(probe["prompts"], probe["principled"], probe["responses"])], when)[0]
    report[when] = {"policy": policy.float(), "base": base.float(), "targets": targets, "mask": mask}


def open_output_dir(run, *args):
    score(run, "start")
    return open_output_dir_of_iqstar(run, *args)


def save_policy(run, tokenizer, output_dir):
    if output_dir == run.args.output_dir:  # the end, not a snapshot
        score(run, "end")
        if run.rank == 0:
            torch.save(report, out_path)
    return save_policy_of_iqstar(run, tokenizer, output_dir)


def load_frozen(*args):
    report["frozen_copies"] += 1
    return load_frozen_of_iqstar(*args)


load_frozen_of_iqstar = iqstar.load_frozen
iqstar.load_frozen = load_frozen
open_output_dir_of_iqstar = iqstar.open_output_dir
save_policy_of_iqstar = iqstar.save_policy
iqstar.open_output_dir = open_output_dir
iqstar.save_policy = save_policy
iqstar.main(argv[2:])
