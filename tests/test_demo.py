"""make demo's claim, on the same world: the principle is distilled into the un-prompted model."""
import json
import os

import pytest

import demo


@pytest.fixture(scope="module")
def demo_run(world_model, tmp_path_factory):
    """The demo as `make demo` runs it (the policy is gathered for sampling: it fits), and its folder."""
    out = tmp_path_factory.mktemp("demo")
    return demo.run(str(out), alpha=1.4, seed=0, world_dir=world_model, quiet=True, timeout=900), out


def test_demo_distils_the_principle(demo_run):
    results, tmp_path = demo_run
    before, after = results["before"]["SFT, no principle"], results["after"]
    assert before["adherence"] < 0.5
    assert after["adherence"] >= 0.85, results["curve"]
    assert after["helpfulness"] >= before["helpfulness"] - 0.05, results["curve"]
    assert len(results["curve"]) == 7  # SFT, then each of the 6 epochs' snapshots
    run_dir = tmp_path / "alpha1.4-seed0"
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert sum(1 for _ in open(run_dir / "metrics.jsonl")) == 6
    assert os.path.isdir(run_dir / "epoch-5") and not os.path.exists(run_dir / "epoch-6")


def test_demo_results_do_not_depend_on_gathering_for_generation(demo_run, world_model, tmp_path):
    gathered, _ = demo_run
    layered = demo.run(str(tmp_path), alpha=1.4, seed=0, world_dir=world_model, quiet=True,
                       flags=["--gather-for-generation", "off"], timeout=900)
    assert len(layered["curve"]) == len(gathered["curve"])
    for a, b in zip(gathered["curve"], layered["curve"]):  # every epoch, same seed: same samples, same training
        assert abs(a["adherence"] - b["adherence"]) < 1e-4 and abs(a["helpfulness"] - b["helpfulness"]) < 1e-4
