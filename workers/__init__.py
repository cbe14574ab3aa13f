"""The worker processes: one model on one device, its runner, batching, broker hooks and bookkeeping."""
