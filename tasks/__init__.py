"""The contract between the API and the workers: settings, model names, queues, payloads, errors.

Imports flow one way: `storage` ← `tasks` ← {`api`, `workers`}. Nothing here imports
torch, onnxruntime or the workers.
"""
