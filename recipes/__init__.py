"""The Hydra configs, shipped inside the package so every command works from any directory."""
