"""One APIRouter per resource or model family (the app includes them in api/app.py)."""
