"""The HTTP API: FastAPI app, routes, admission and the hub that talks to the workers through Redis."""
