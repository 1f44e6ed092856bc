"""make bench's benchmarks (python -m bench.bench) and, in peer/, make bench-peer's comparison with TRL's
SDFTTrainer (python -m bench.peer.peer), run from the repository root."""
