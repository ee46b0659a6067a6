"""Training infrastructure: atomic checkpoint files, the resolved-config saver, FSDP2 sharding."""
