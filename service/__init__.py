"""The inference microservice: FastAPI with dynamic batching (run it with `python -m service`)."""
