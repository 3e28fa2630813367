"""Training DiT-Reward: HPSv3-format preference data (`data`), the latent/text-embedding cache (`cache`), the
Bradley-Terry trainer with FSDP2 and exact resume (`train`), and per-block linear probes (`probe`)."""
