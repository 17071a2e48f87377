"""lm-eval YAML task files for the offline `openllm-v1-local` and `cpu` presets (package data)."""
