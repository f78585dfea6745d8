"""The server's one configuration object, built once by `app.py` and passed to broker and workers."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from bert.config import EncoderOptions


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server runs with.

    - `encoder`: the model and pooling (see `bert.config.EncoderOptions`).
    - `num_worker`: worker processes; each owns one GPU, or a share of the CPU cores.
    - `host`, `port`: where clients connect (host '*' = every interface).
    - `max_batch_size`: a request larger than this many sentences is split into mini-batches of
      this size, spread over workers and reassembled in order.
    - `max_client_batch_size`: a request over this many sentences is refused.
    - `max_request_bytes`: a request over this many bytes is refused.
    - `max_queue`: sentences waiting for a worker; past it new requests get a "busy" error at once.
    - `max_queue_tokens`: the same bound in estimated tokens (see `service/scheduler.py`).
    - `max_client_tokens`: estimated tokens one client (or door user) may have queued.
    - `max_client_requests`: unfinished requests one client (or door user) may have.
    - `max_timeout`: seconds a request may wait in all: the deadline of requests that set no
      timeout, and the cap of those that set a longer one.
    - `max_unread_replies`: replies the server holds for a client that does not read them (the
      client port's send high-water mark); more are dropped, counted and logged.
    - `cpu`: run on CPU even where a GPU is visible.
    - `device_map`: GPU ids the workers are spread over, round-robin (empty: all visible GPUs).
    - `cpu_threads`: torch threads per CPU worker (None: the machine's cores divided between workers).
    - `output_dtype`: 'float32' or 'float16' on the wire.
    - `auth_dir`: CurveZMQ keys (server.key_secret and clients/*.key); None: no authentication.
    - `zmq_client_port`: serve the client port with a libzmq socket rather than the broker's own
      ZMTP reader (service/zmtp.py); always so with `auth_dir`.
    - `startup_timeout`: seconds a worker may take to load the model.
    - `verbose`: debug logging.
    - `stall_timeout`: seconds a worker may hold jobs without any of them moving on (tokenized, a
      forward pass started or done) before it stops heartbeating and is replaced.
    - `fault_dir`: fault injection for drills and tests ($BERT_SERVING_FAULT_DIR): files named
      `tokenize`, `compute` or `stall` in it break one worker's stage once (see `service/worker.py`).
      None (the default): off.
    - `http_port`: the HTTP door's port (OpenAI /v1/embeddings, TEI routes, /health, /metrics);
      None: no HTTP. `http_host`: its interface (None: the same as `host`).
    - `v1_port`, `v1_port_out`: the 2019 protocol's two ports (bert-serving-client 1.10 PUSHes
      requests to the first and SUBscribes to replies on the second); None: off. Both or neither.
    - `api_key`: the Bearer token the HTTP embedding routes require (None: open). Kept out of
      `repr()` and `public()`, so it never reaches a log line.
    - `worker_port`: a head's port (on `host`) where workers of other hosts join (None: local
      workers only); with it `num_worker` may be 0, a head that only routes.
    - `join`: `tcp://HEAD:PORT`: this process is a worker host serving that head's queue; the head
      decides every option that changes a vector. `worker_name`: its key pair in
      `auth_dir/workers` when the head requires keys.
    """

    encoder: EncoderOptions = field(default_factory=EncoderOptions)
    num_worker: int = 1
    host: str = "*"
    port: int = 5555
    max_batch_size: int = 256
    max_client_batch_size: int = 32768
    max_request_bytes: int = 64 * 1024 * 1024
    max_queue: int = 200_000
    max_queue_tokens: int = 20_000_000
    max_client_tokens: int = 2_000_000
    max_client_requests: int = 64
    max_timeout: float = 300.0
    max_unread_replies: int = 8
    cpu: bool = False
    device_map: tuple[int, ...] = ()
    cpu_threads: int | None = None
    output_dtype: str = "float32"
    auth_dir: str | None = None
    zmq_client_port: bool = False
    startup_timeout: float = 600.0
    verbose: bool = False
    stall_timeout: float = 300.0
    fault_dir: str | None = None
    http_port: int | None = None
    http_host: str | None = None
    v1_port: int | None = None
    v1_port_out: int | None = None
    api_key: str | None = field(default=None, repr=False)
    worker_port: int | None = None
    join: str | None = None
    worker_name: str = "worker"

    def __post_init__(self) -> None:
        checks = [
            (self.num_worker >= 1 or (self.num_worker == 0 and self.worker_port is not None),
             f"num_worker must be at least 1 (0 only with -worker_port), got {self.num_worker}"),
            (self.worker_port is None or 0 < self.worker_port < 65536,
             f"worker_port must be between 1 and 65535, got {self.worker_port}"),
            (self.join is None or self.join.startswith("tcp://"), f"-join takes tcp://HEAD:PORT, got {self.join!r}"),
            (self.join is None or self.worker_port is None, "-join (a worker host) and -worker_port (a head) exclude each other"),
            (self.join is None or (self.http_port is None and self.v1_port is None),
             "-join (a worker host) serves no clients: drop -http_port and -v1_port"),
            (0 < self.port < 65536, f"port must be between 1 and 65535, got {self.port}"),
            (self.max_batch_size >= 1, f"max_batch_size must be at least 1, got {self.max_batch_size}"),
            (self.max_client_batch_size >= 1, "max_client_batch_size must be at least 1"),
            (self.max_request_bytes >= 1024, "max_request_bytes must be at least 1024"),
            (self.max_queue >= 1, "max_queue must be at least 1"),
            (self.stall_timeout >= 1, f"stall_timeout must be at least 1 second, got {self.stall_timeout}"),
            (self.max_queue_tokens >= 1, "max_queue_tokens must be at least 1"),
            (self.max_client_tokens >= 1, "max_client_tokens must be at least 1"),
            (self.max_client_requests >= 1, "max_client_requests must be at least 1"),
            (self.max_timeout > 0, "max_timeout must be a positive number of seconds"),
            (self.max_unread_replies >= 1, "max_unread_replies must be at least 1"),
            (self.output_dtype in ("float32", "float16"), f"output_dtype must be float32 or float16, got {self.output_dtype!r}"),
            (self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads must be at least 1"),
            (self.http_port is None or 0 < self.http_port < 65536,
             f"http_port must be between 1 and 65535, got {self.http_port}"),
            (self.http_port != self.port, f"-http_port and -port must differ, both are {self.port}"),
            (all(p is None or 0 < p < 65536 for p in (self.v1_port, self.v1_port_out)),
             "v1_port and v1_port_out must be between 1 and 65535"),
            ((self.v1_port is None) == (self.v1_port_out is None),
             "-v1_port and -v1_port_out go together: the 2019 client needs both"),
            (len(set(self.ports())) == len(self.ports()),
             f"-port, -http_port, -v1_port and -v1_port_out must all differ (and from -worker_port), got {self.ports()}"),
            (self.api_key is None or (self.api_key.strip() == self.api_key and self.api_key != ""),
             "api_key must be a non-empty string without surrounding spaces"),
            (self.api_key is None or self.http_port is not None, "-api_key protects the HTTP door: it needs -http_port"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def ports(self) -> list[int]:
        """Every TCP port the server opens."""
        return [p for p in (self.port, self.http_port, self.v1_port, self.v1_port_out, self.worker_port) if p is not None]

    @property
    def threads_per_worker(self) -> int:
        """torch threads of a CPU worker: -cpu_threads, else the cores divided between the workers
        (each using every core would oversubscribe them)."""
        return self.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, self.num_worker))

    def public(self) -> dict:
        """Every setting under its flag's name, as plain JSON values, for logs and the client's
        `server_config()`. Model settings left to the folder are None here: the server adds the values
        the model came to (pooling_strategy, max_seq_len, do_lower_case...) when a worker has loaded it.
        Only whether keys are required is told, not where the server keeps them."""
        e = self.encoder
        return {
            "model_dir": e.model_dir, "pooling_strategy": e.pooling_strategy,
            "pooling_layer": list(e.pooling_layer) if e.pooling_layer is not None else None,
            "mask_cls_sep": e.mask_cls_sep, "normalize": e.normalize, "max_seq_len": e.max_seq_len,
            "do_lower_case": e.do_lower_case, "dtype": e.dtype, "max_batch_tokens": e.max_batch_tokens,
            "cpu_engine": e.cpu_engine, "onnx_cache_dir": e.onnx_cache_dir, "cpu_spin": e.cpu_spin,
            "cuda_graphs": e.cuda_graphs,
            "num_worker": self.num_worker, "host": self.host, "port": self.port, "cpu": self.cpu,
            "device_map": list(self.device_map), "cpu_threads": self.threads_per_worker,
            "max_batch_size": self.max_batch_size, "max_client_batch_size": self.max_client_batch_size,
            "max_request_bytes": self.max_request_bytes, "max_queue": self.max_queue,
            "max_queue_tokens": self.max_queue_tokens, "max_client_tokens": self.max_client_tokens,
            "max_client_requests": self.max_client_requests, "max_timeout": self.max_timeout,
            "max_unread_replies": self.max_unread_replies,
            "output_dtype": self.output_dtype, "authentication": self.auth_dir is not None,
            "zmq_client_port": self.zmq_client_port or self.auth_dir is not None,
            "verbose": self.verbose, "http_port": self.http_port, "http_host": self.http_host,
            "http_api_key": self.api_key is not None, "stall_timeout": self.stall_timeout,
            "fault_injection": self.fault_dir is not None, "v1_port": self.v1_port, "v1_port_out": self.v1_port_out,
            "worker_port": self.worker_port, "join": self.join, "worker_name": self.worker_name,
        }
