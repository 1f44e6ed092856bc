"""make bench-peer: iqstar against TRL's SDFTTrainer on the same run (peer.py; sdft_run.py is its SDFT run)."""
