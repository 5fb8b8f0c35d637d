"""The Celery application both sides share: web processes send generation tasks, GPU workers run them."""

from __future__ import annotations

import logging
import ssl
from functools import partial
from urllib.parse import parse_qs, urlsplit

import redis
from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Connection
from kombu.transport import redis as kombu_redis

from service.settings import Settings

log = logging.getLogger(__name__)
GENERATE_TASK = "generation.generate"
QUEUE = "generation"


class _Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        # When Redis goes away, Celery closes the connection and then its channel, which tries to put the
        # unacknowledged tasks back into the queue through the connection just closed: kombu then fails
        # with AttributeError ("'NoneType' object has no attribute 'hostname'", as in celery/kombu#970), which
        # Celery takes for an unrecoverable error, and the GPU worker exits for good. Said as the lost
        # connection it is, Celery reconnects; the tasks stay in Redis's unacknowledged set (kept by its
        # append-only file) and come back after the visibility timeout.
        if self.connection.client is None:
            raise redis.ConnectionError("the connection to Redis is closed")
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport (redis:// and rediss://), with a closed connection said as such. GPU workers
    consume with it (service/gpu_worker.py); Flower, on the same app, names the broker by its URL's scheme
    and keeps kombu's own."""

    Channel = _Channel


MENDED_TRANSPORT = f"{__name__}:{RedisTransport.__name__}"
# A GPU worker tries Redis again at most this long after the last try, however long it has been away.
RECONNECT_MAX_S = 3


class QuickConsumer(Consumer):
    """Celery's consumer, trying a lost broker again every RECONNECT_MAX_S at most (Celery's own back-off grows
    to 30 s, and a GPU worker would idle that long after Redis came back), for as long as it takes."""

    def ensure_connected(self, conn: Connection) -> Connection:
        conn.ensure_connection = partial(
            conn.ensure_connection, interval_start=0.5, interval_step=0.5, interval_max=RECONNECT_MAX_S
        )
        return super().ensure_connected(conn)


QUICK_CONSUMER = f"{__name__}:{QuickConsumer.__name__}"


def make_celery(settings: Settings) -> Celery:
    app = Celery("stable_diffusion_api", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        # JSON only: a pickle from the broker would run code in the GPU worker.
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=QUEUE,
        # Acknowledged only once done, and given back when the worker process dies mid-way, so a task a
        # killed GPU worker held runs on another one (Redis hands it out again after the visibility timeout).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={
            "visibility_timeout": settings.task_visibility_timeout_s,
            # Look for such tasks every few seconds (kombu's default sweep is about 100 s apart).
            "unacked_restore_interval": max(1, min(10, int(settings.task_visibility_timeout_s / 2))),
            "unacked_restore_throttle": 1,
        },
        # One batch's worth per worker (its concurrency is BATCH_SIZE): never a hoard an idle worker could take.
        worker_prefetch_multiplier=1,
        # A web process with Redis gone answers 503 at once instead of retrying the publish.
        task_publish_retry=False,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        # Never give up on Redis (Celery's default stops the worker after 100 tries).
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        broker_use_ssl=tls_options(settings.redis_url),
    )
    return app


CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def tls_options(url: str) -> dict | None:
    """For rediss://: the URL's ssl_* parameters as Celery's broker_use_ssl, the certificate verified unless
    the URL says ssl_cert_reqs=none. redis-py (the ledger, the job store) verifies by default. kombu takes
    ssl_* parameters from the URL, but with none there it would connect unverified; Flower reads only this
    setting, never the URL."""
    if urlsplit(url).scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items() if key.startswith("ssl_")}
    options = {key: query[key] for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if key in query}
    wanted = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if wanted == "none":
        log.warning("REDIS_URL says ssl_cert_reqs=none: Redis's certificate is not verified (anyone on the path "
                    "can read and change the queue); remove it, and name a private CA with ssl_ca_certs=")
    return options | {"ssl_cert_reqs": CERT_REQS.get(wanted, ssl.CERT_REQUIRED)}
