"""QUEUE_BACKEND=celery: web processes hand generations to GPU worker processes through Celery on Redis."""
