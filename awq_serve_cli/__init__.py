"""The `awq-serve` command: quantization (`quantize|list|verify|demo`) and serving
(`keys|rollout|rollback|cost`) subcommands, each importing only what it needs."""
