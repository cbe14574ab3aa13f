"""SAM3 video sessions on a worker, in three parts: `tracker` (the models), `sessions` (state and calls), `propagate` (propagation jobs)."""
