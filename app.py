"""Start the sentence-encoding server.

    python app.py                                  # the bundled all-MiniLM-L6-v2, one worker, port 5555
    python app.py -num_worker=4 -model_dir /tmp/uncased_L-12_H-768_A-12/
    python app.py -keygen keys/                    # CurveZMQ key pairs for -auth_dir
    python app.py -worker_port 5556 -num_worker 0  # a head that routes to worker hosts...
    python app.py -join tcp://HEAD:5556            # ...and a worker host (see README "Scaling out")

Installed (`pip install .`), the same command line is `bert-serving-start` (or `python -m service`).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from bert.config import CPU_ENGINES, DTYPES, MODEL_MAX_SEQ_LEN, STRATEGIES, STRATEGY_ALIASES, EncoderOptions
from bert.errors import CheckpointError
from bert.resolve import resolve_encoder
from service.checks import device_warnings, settings_warnings
from service.config import ServerConfig
from service.logs import configure_logging

log = logging.getLogger("app")

API_KEY_ENV = "BERT_SERVING_API_KEY"  # -api_key from the environment, so the key stays out of `ps`
FAULT_DIR_ENV = "BERT_SERVING_FAULT_DIR"  # fault injection for drills and tests (service/worker.py)


def str_to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], refused with the bounds otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'between {low} and {high}' if high else f'at least {low}'}, "
                                             f"got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def seq_len(text: str) -> int | str:
    """An argparse type for -max_seq_len: at least 2 tokens, or NONE (the model's own limit, as in 2019)."""
    return MODEL_MAX_SEQ_LEN if text.strip().upper() == MODEL_MAX_SEQ_LEN else int_at_least(2)(text)


seq_len.__name__ = "max_seq_len"


def seconds_at_least(low: float):
    """An argparse type: a number of seconds, at least `low`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not value >= low or value == float("inf"):  # `not >=` also refuses NaN
            raise argparse.ArgumentTypeError(f"must be at least {low:g} s, got {text}")
        return value
    parse.__name__ = "float"
    return parse


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default unless its help already explains it or there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """Also refuses flags that only make sense together, in argparse's words (exit 2)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if parsed.num_worker == 0 and parsed.worker_port is None:
            self.error("argument -num_worker: must be at least 1, got 0 (0 only with -worker_port: a head that "
                       "only routes to worker hosts)")
        return parsed


def build_parser(prog: str = "app.py") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="Serve sentence vectors from a BERT-family model over ZeroMQ.",
        formatter_class=HelpFormatter,
        epilog="Clients: from service.client import BertClient; BertClient(ip=..., port=...).encode([...])")
    model = p.add_argument_group("model")
    model.add_argument("-model_dir", default=None,
                       help="Google BERT, Hugging Face or sentence-transformers folder (default: the bundled all-MiniLM-L6-v2)")
    model.add_argument("-pooling_strategy", choices=list(STRATEGIES) + list(STRATEGY_ALIASES), type=str.upper, default=None,
                       help="how token vectors become a sentence vector (default: the folder's own; REDUCE_MEAN for plain "
                            "BERT); the 2019 names FIRST_TOKEN and LAST_TOKEN mean CLS_TOKEN and SEP_TOKEN")
    model.add_argument("-pooling_layer", type=int, nargs="+", default=None,
                       help="hidden layer(s) to pool, negative from the top; several concatenate (default: -2 for plain BERT, -1 for sentence-transformers)")
    model.add_argument("-mask_cls_sep", action="store_true", help="leave [CLS] and [SEP] out of mean and max pooling")
    model.add_argument("-normalize", type=str_to_bool, nargs="?", const=True, default=None,
                       help="L2-normalise vectors (default: the folder's own)")
    model.add_argument("-max_seq_len", type=seq_len, default=None,
                       help="tokens per sentence incl. [CLS]/[SEP]; longer is truncated (default: the model's own, at most 512; "
                            f"{MODEL_MAX_SEQ_LEN}: as many as the model has positions for)")
    model.add_argument("-do_lower_case", type=str_to_bool, nargs="?", const=True, default=None,
                       help="lower-case input (default: follows the folder, e.g. uncased_* vs cased_*)")
    compute = p.add_argument_group("compute")
    compute.add_argument("-num_worker", type=int_at_least(0), default=1,
                         help="worker processes (each owns a GPU or a share of the CPU cores); 0 only with -worker_port")
    compute.add_argument("-cpu", action="store_true", help="run on CPU even if a GPU is visible")
    compute.add_argument("-device_map", type=int_at_least(0), nargs="+", default=[], help="GPU ids to spread workers over, round-robin (default: all visible)")
    compute.add_argument("-dtype", choices=DTYPES, default="auto",
                         help="precision of the encoder: auto is fp16 on GPU, fp32 on CPU (fp16/bf16 on a CPU are "
                              "allowed but warned about: much slower there unless it has AMX or AVX-512 for them)")
    compute.add_argument("-fp16", dest="dtype", action="store_const", const="fp16", help="same as -dtype fp16")
    compute.add_argument("-bf16", dest="dtype", action="store_const", const="bf16", help="same as -dtype bf16")
    compute.add_argument("-cpu_threads", type=int_at_least(1), default=None, help="torch threads per CPU worker (default: cores / num_worker)")
    compute.add_argument("-max_batch_size", type=int_at_least(1), default=256, help="a request is split into mini-batches of this many sentences, spread over workers")
    compute.add_argument("-stall_timeout", type=seconds_at_least(1), default=300.0,
                         help="seconds a worker may hold jobs that make no progress (no job tokenized, no "
                              "forward pass started or finished) before it stops heartbeating and the "
                              "broker replaces it and re-sends them; keep it above your longest single pass "
                              "(-max_batch_tokens padded tokens)")
    compute.add_argument("-max_batch_tokens", type=int_at_least(1), default=None,
                         help="padded tokens per forward pass (default: 512 on CPU, 65536 on GPU)")
    compute.add_argument("-cpu_engine", choices=CPU_ENGINES, default="onnx",
                         help="what runs the model on a CPU in fp32: onnx (ONNX Runtime on a graph exported from "
                              "the same weights at start-up and cached; about 2x lower latency) or torch")
    compute.add_argument("-cpu_spin", type=str_to_bool, nargs="?", const=True, default=True,
                         help="ONNX Runtime's threads spin for ~50 ms after each forward pass, ready for the next "
                              "(default: yes; lowest latency, but a core busy after every request); no: they sleep "
                              "when a pass is done: a quarter of the CPU at a few requests a second, for a "
                              "higher latency (see the README's speed section)")
    compute.add_argument("-cuda_graphs", type=str_to_bool, nargs="?", const=True, default=True,
                         help="on a GPU, capture CUDA graphs at start-up for batches of up to 8 sentences and "
                              "replay them: one launch per query instead of one per operator (default: yes; "
                              "a few seconds more at start-up). No effect on a CPU")
    compute.add_argument("-onnx_cache_dir", default=None,
                         help="where exported ONNX graphs are cached (default: ~/.cache/bert-as-service/onnx)")
    net = p.add_argument_group("network and limits")
    net.add_argument("-port", type=int_at_least(1, 65535), default=5555, help="port clients connect to")
    net.add_argument("-host", default="*", help="interface to listen on ('*' = all, '127.0.0.1' = this machine only)")
    net.add_argument("-output_dtype", choices=("float32", "float16"), default="float32", help="vector type on the wire")
    net.add_argument("-max_client_batch_size", type=int_at_least(1), default=32768, help="largest request, in sentences")
    net.add_argument("-max_request_bytes", type=int_at_least(1024), default=64 * 1024 * 1024, help="largest request, in bytes")
    net.add_argument("-max_queue", type=int_at_least(1), default=200_000, help="sentences waiting for a worker before new requests get a 'busy' error")
    net.add_argument("-max_queue_tokens", type=int_at_least(1), default=20_000_000,
                     help="estimated tokens waiting for a worker before new requests get a 'busy' error")
    net.add_argument("-max_client_tokens", type=int_at_least(1), default=2_000_000,
                     help="estimated tokens one client (or HTTP user) may have queued; a first request is always let in")
    net.add_argument("-max_client_requests", type=int_at_least(1), default=64,
                     help="unfinished requests one client (or HTTP user) may have")
    net.add_argument("-max_timeout", type=int_at_least(1), default=300,
                     help="seconds a request may wait, in all: for requests without a timeout, and the cap of longer ones")
    net.add_argument("-max_unread_replies", type=int_at_least(1), default=8,
                     help="replies held for a client that does not read them; more are dropped and counted")
    net.add_argument("-auth_dir", default=None, help="CurveZMQ: encrypt and admit only the client keys in AUTH_DIR/clients")
    net.add_argument("-zmq_client_port", action="store_true",
                     help="serve the client port with a libzmq socket, not the broker's own ZMTP reader "
                          "(one more thread per message: p99 ~10%% higher on 2 cores; always so with -auth_dir)")
    net.add_argument("-keygen", metavar="DIR", default=None, help="create CurveZMQ keys in DIR (server pair once, plus one client pair) and exit")
    net.add_argument("-client_name", default="client", help="name of the client key pair -keygen creates")
    net.add_argument("-worker_name", default=None, help="with -keygen: make a worker host's key pair NAME in DIR/workers; "
                     "with -join -auth_dir: the key pair this host uses (default: worker)")
    scale = p.add_argument_group("scaling out (README: Scaling out)")
    scale.add_argument("-worker_port", type=int_at_least(1, 65535), default=None,
                       help="head: also take workers of other hosts on this port of -host (default: local workers only)")
    scale.add_argument("-join", metavar="tcp://HEAD:PORT", default=None,
                       help="worker host: serve that head's queue with -num_worker workers here; the head decides "
                            "every option that changes a vector")
    http = p.add_argument_group("HTTP (OpenAI /v1/embeddings, TEI routes, /health, /metrics)")
    http.add_argument("-http_port", type=int_at_least(1, 65535), default=None,
                      help="serve HTTP on this port too (default: no HTTP)")
    http.add_argument("-http_host", default=None, help="interface for HTTP (default: the same as -host)")
    http.add_argument("-api_key", default=None,
                      help=f"Bearer token the HTTP embedding routes require; /health and /metrics stay open "
                           f"(default: ${API_KEY_ENV} when -http_port is set, else none; the variable keeps "
                           "the key out of `ps`)")
    v1 = p.add_argument_group("the 2019 protocol (unmodified bert-serving-client 1.10)")
    v1.add_argument("-v1_port", type=int_at_least(1, 65535), default=None,
                    help="port bert-serving-client 1.10 pushes requests to: its BertClient(port=...) (default: off)")
    v1.add_argument("-v1_port_out", type=int_at_least(1, 65535), default=None,
                    help="port it reads replies from: its BertClient(port_out=...) (default: off; needs -v1_port)")
    p.add_argument("-verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    encoder = EncoderOptions(
        model_dir=args.model_dir, pooling_strategy=STRATEGY_ALIASES.get(args.pooling_strategy, args.pooling_strategy),
        pooling_layer=tuple(args.pooling_layer) if args.pooling_layer else None, mask_cls_sep=args.mask_cls_sep,
        normalize=args.normalize, max_seq_len=args.max_seq_len, do_lower_case=args.do_lower_case,
        dtype=args.dtype, max_batch_tokens=args.max_batch_tokens, cpu_engine=args.cpu_engine,
        onnx_cache_dir=args.onnx_cache_dir, cpu_spin=args.cpu_spin, cuda_graphs=args.cuda_graphs)
    return ServerConfig(
        encoder=encoder, num_worker=args.num_worker, host=args.host, port=args.port,
        max_batch_size=args.max_batch_size, max_client_batch_size=args.max_client_batch_size,
        max_request_bytes=args.max_request_bytes, max_queue=args.max_queue, cpu=args.cpu,
        max_queue_tokens=args.max_queue_tokens, max_client_tokens=args.max_client_tokens,
        max_client_requests=args.max_client_requests, max_timeout=float(args.max_timeout),
        max_unread_replies=args.max_unread_replies,
        device_map=tuple(args.device_map), cpu_threads=args.cpu_threads, output_dtype=args.output_dtype,
        auth_dir=args.auth_dir, zmq_client_port=args.zmq_client_port, verbose=args.verbose,
        http_port=args.http_port, http_host=args.http_host,
        v1_port=args.v1_port, v1_port_out=args.v1_port_out, api_key=api_key(args), stall_timeout=args.stall_timeout,
        fault_dir=os.environ.get(FAULT_DIR_ENV) or None, worker_port=args.worker_port, join=args.join,
        worker_name=args.worker_name or "worker")


def api_key(args: argparse.Namespace) -> str | None:
    """-api_key, else the environment's key when HTTP is on (a key set for another run stays unused)."""
    if args.api_key is not None or args.http_port is None:
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def keygen(folder: str, client_name: str) -> int:
    from service.auth import KeygenError, make_keys

    try:
        paths = make_keys(folder, client_name)
    except (KeygenError, OSError) as e:
        log.error("-keygen: %s", e)
        return 1
    print(f"server public key:  {paths['server_public']}   (give this to clients)")
    print(f"server secret key:  {paths['server_secret']}   (keep on the server)")
    print(f"client key pair:    {paths['client_secret']}   (give this to the client '{client_name}')")
    print(f"client allowed via: {paths['client_public']}")
    print(f"start the server with: {program_name()} -auth_dir {folder}")
    return 0


def worker_keygen(folder: str, worker_name: str) -> int:
    from service.auth import KeygenError, make_worker_keys

    try:
        paths = make_worker_keys(folder, worker_name)
    except (KeygenError, OSError) as e:
        log.error("-keygen: %s", e)
        return 1
    print(f"server public key:  {paths['server_public']}   (copy to the worker host)")
    print(f"worker key pair:    {paths['worker_secret']}   (copy to the worker host '{worker_name}' only)")
    print(f"worker allowed via: {paths['worker_public']}")
    print(f"head: {program_name()} -auth_dir {folder} -worker_port PORT ...;  worker host: {program_name()} "
          f"-join tcp://HEAD:PORT -auth_dir {folder} -worker_name {worker_name}")
    return 0


# Options a worker host takes from its head; given to `-join` they would be silently overridden.
HEAD_DECIDES = ("pooling_strategy", "pooling_layer", "mask_cls_sep", "normalize", "max_seq_len", "do_lower_case",
                "output_dtype")


def join(config: ServerConfig, args: argparse.Namespace) -> int:
    """Run a worker host (`-join`): until SIGTERM/SIGINT, or exit 1 when the head refuses it."""
    from service.errors import StartupError
    from service.join import JoinHost

    defaults = build_parser().parse_args([])
    overridden = [f"-{name}" for name in HEAD_DECIDES if getattr(args, name) != getattr(defaults, name)]
    if args.dtype != defaults.dtype:
        overridden.append("-dtype")
    if overridden:
        log.warning("%s ignored with -join: the head decides every option that changes a vector", ", ".join(overridden))
    host = JoinHost(config)

    def request_stop(signum: int, _frame) -> None:
        log.info("%s received", signal.Signals(signum).name)
        host.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        return host.run()
    except (StartupError, CheckpointError) as e:
        log.error("cannot start: %s", e)
        return 1


def client_call(config: ServerConfig) -> str:
    """The line a client runs to reach this server, with the key arguments when keys are required."""
    host = config.host if config.host not in ("*", "0.0.0.0") else socket.gethostname()
    keys = ""
    if config.auth_dir:
        from service.auth import server_key_paths
        secrets = sorted(p.name for p in Path(config.auth_dir).glob("*.key_secret") if p.name != "server.key_secret")
        client_key = Path(config.auth_dir) / (secrets[0] if len(secrets) == 1 else "NAME.key_secret")
        keys = f", server_public_key='{server_key_paths(config.auth_dir)[0]}', client_key='{client_key}'"
    local = config.host in ("*", "0.0.0.0", "127.0.0.1", "localhost")
    return f"BertClient(ip='{host}', port={config.port}{keys})" + \
        (f" or BertClient({keys.lstrip(', ')}) on this machine" if local and config.port == 5555 else "")


def program_name() -> str:
    """How the user started the server, for -h and error messages: app.py, bert-serving-start..."""
    name = Path(sys.argv[0]).name
    return "python -m service" if name == "__main__.py" else name or "app.py"


def main(argv: list[str] | None = None) -> int:
    args = build_parser(program_name()).parse_args(argv)
    configure_logging(args.verbose)
    if args.keygen:
        return worker_keygen(args.keygen, args.worker_name) if args.worker_name else keygen(args.keygen, args.client_name)
    if args.client_name != "client":
        log.warning("-client_name only names the key pair -keygen creates; without -keygen it is ignored")
    try:
        config = config_from_args(args)
        if config.join:
            return join(config, args)
        # The model's files (not its weights) decide the settings left open: refuse a bad folder or an
        # impossible -max_seq_len/-pooling_layer now, before the port opens or a worker starts.
        resolved = resolve_encoder(config.encoder)
    except (CheckpointError, ValueError) as e:
        log.error("cannot start: %s", e)
        return 1
    folder = resolved.folder
    log.info("model: %s (%s, %d layers, hidden %d)", folder.path, folder.kind,
             folder.config.num_hidden_layers, folder.config.hidden_size)
    log.info("lower-casing %s (%s)", "on" if resolved.tokenizer.lowercases else "off",
             "-do_lower_case" if config.encoder.do_lower_case is not None else "the folder's own")
    log.info("config: %s", ", ".join(f"{k}={v}" for k, v in config.public().items()))
    if config.fault_dir:
        log.warning("fault injection is on (%s=%s): files named tokenize, compute or stall there break a "
                    "worker on purpose", FAULT_DIR_ENV, config.fault_dir)
    for warning in settings_warnings(config, resolved):
        log.warning("%s", warning)

    from service.broker import Broker, StartupError
    broker = Broker(config)

    def request_stop(signum: int, _frame) -> None:
        log.info("%s received", signal.Signals(signum).name)
        broker.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        broker.start()
    except (StartupError, FileNotFoundError) as e:
        log.error("cannot start: %s", e)
        broker.shutdown()
        return 1
    broker.serve_forever(on_ready=lambda: log_ready(broker, config))
    return broker.exit_code


def log_ready(broker, config: ServerConfig) -> None:
    """The lines a user (and the test harness) waits for: what is served, and where."""
    if config.num_worker == 0:
        log.info("routing to the workers of other hosts that join on %s (none on this host)", broker.worker_port.address)
        log.info("ready on tcp://%s:%d: clients use %s", config.host, config.port, client_call(config))
        return
    info = broker.encoder_info
    devices = {s.info.get("device", "?") for s in broker.slots}
    for warning in device_warnings(config, devices, info.get("dtype", "")):
        log.warning("%s", warning)
    pooling = info.get("pooling_strategy") or "+".join(info.get("pooling_modes", []))
    log.info("serving %s vectors of dim %s (%s of layer %s, max_seq_len %s, lower-casing %s), computed in %s "
             "by %d worker%s on %s", config.output_dtype, info.get("dim"), pooling,
             " ".join(map(str, info.get("pooling_layer", []))), info.get("max_seq_len"),
             "on" if info.get("do_lower_case") else "off", info.get("dtype"), config.num_worker,
             "s" if config.num_worker > 1 else "", ", ".join(sorted(devices)))
    log.info("ready on tcp://%s:%d: clients use %s", config.host, config.port, client_call(config))


if __name__ == "__main__":
    sys.exit(main())
