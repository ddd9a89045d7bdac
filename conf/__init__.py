"""paraflow's Hydra configs, installed as the package `paraflow.conf` (Hydra's pkg://paraflow.conf)."""
