"""The Hugging Face format in one place: the DeepseekV3/Kimi-K2 config and weight-name mapping
to and from megatron's (`mapping`), streaming safetensors I/O (`safetensors_io`) and block-FP8
(`fp8`). `k2mcore.model` (load_model) and `k2mcore.convert` (k2m-convert) both use it and import
each other no more. Import-light: torch only, no megatron, no process group.
"""
