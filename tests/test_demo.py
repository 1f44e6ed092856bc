"""make demo's claim, on the same world: the principle is distilled into the un-prompted model."""

import json
import os

import pytest

import demo


@pytest.mark.process
def test_demo_distils_the_principle(world_model, tmp_path):
    results = demo.run(str(tmp_path), alpha=1.4, seed=0, world_dir=world_model, quiet=True, timeout=900)
    before, after = results["before"]["SFT, no principle"], results["after"]
    assert before["adherence"] < 0.5
    assert after["adherence"] >= 0.85, results["curve"]
    assert after["helpfulness"] >= before["helpfulness"] - 0.05, results["curve"]
    assert len(results["curve"]) == 7  # SFT, then each of the 6 epochs' snapshots
    run_dir = tmp_path / "alpha1.4-seed0"
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert sum(1 for _ in open(run_dir / "metrics.jsonl")) == 6
    assert os.path.isdir(run_dir / "epoch-5") and not os.path.exists(run_dir / "epoch-6")
