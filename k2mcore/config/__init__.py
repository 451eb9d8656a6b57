"""The run's configuration: one dataclass tree (`schema`), YAML presets and `--set` overrides
(`loader`), and the checks that do not depend on the world size (`validate`). Torch-free."""
