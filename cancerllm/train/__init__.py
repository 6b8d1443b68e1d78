"""Training machinery behind train.py: config schema, device mesh and FSDP2, optimizer and schedule, LoRA, the
training step, checkpoints and export, metrics."""
