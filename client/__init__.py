"""The user side: the `trifecta` CLI, the Python SDK, the supervisor of `trifecta up` and the bench."""
