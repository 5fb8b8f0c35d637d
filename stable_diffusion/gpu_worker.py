"""`python -m stable_diffusion.gpu_worker`: starts a GPU worker for QUEUE_BACKEND=celery under the name operators
were given for it. The worker itself is wired in the service layer (service/gpu_worker.py: Celery, the queue
ledger, the model's worker thread), which sits above this package; this module only hands the process over to it
and imports nothing of the project (tests/test_layers.py keeps it so)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("service.gpu_worker", run_name="__main__", alter_sys=True)
