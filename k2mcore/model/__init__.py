"""The K2 transformer on megatron-core: specs, build, HF mapping and load_model."""
