"""One runner per model family behind the hook contract of workers/runners/base.py."""
