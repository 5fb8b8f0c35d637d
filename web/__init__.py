"""The HTTP resources of the API, one blueprint per module; `app.py` assembles and serves them."""
