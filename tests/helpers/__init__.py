"""Helpers several test modules share (stacks, tiny checkpoints, media)."""
