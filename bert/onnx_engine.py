"""ONNX Runtime as the CPU engine: our own PyTorch model, exported once to ONNX and cached on disk.

Why: one sentence on a 2-core CPU took 16 ms through PyTorch and 7 ms through ONNX Runtime on the
same weights (issue 13); for a short sentence PyTorch's per-operator dispatch, not arithmetic, is
most of the time. The graph is exported from `bert/modeling.py` and `bert/pooling.py` themselves,
so there is one model definition; ONNX Runtime only runs it. GPUs keep PyTorch.

The cache file is named by a fingerprint of everything the graph depends on (config, weights,
layers, pooling, export settings), so a changed model never meets a stale graph. A cached graph
that does not load, or whose vectors differ from PyTorch's on a probe batch, is exported again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import PoolingConfig
from .modeling import BertModel, Embeddings, SelfAttention
from .pooling import pool
from .tokenization import TokenBatch

log = logging.getLogger(__name__)

ENGINES = ("onnx", "torch")
DEFAULT_CACHE_DIR = "~/.cache/bert-as-service/onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
# Bump when ExportedEncoder or the export call changes: cached graphs of older versions are not reused.
EXPORT_VERSION = 4
# A graph whose probe vectors differ from PyTorch's by more than this is treated as damaged.
# (ONNX Runtime's fused kernels differ by ~2e-7 on normalised MiniLM vectors.)
PROBE_TOLERANCE = 1e-4


class EagerAttention(nn.Module):
    """`SelfAttention` written out for export: separate q, k and v projections, scores, an additive
    mask, softmax. Same weights and the same vectors; it exists because this is the form ONNX
    Runtime's transformer optimizer recognises and fuses into its Attention kernel, while the
    exported form of `scaled_dot_product_attention` is left as ~20 small operators per layer
    (one sentence on 2 cores: 3.9 -> 3.4 ms per forward pass)."""

    def __init__(self, attention: SelfAttention) -> None:
        super().__init__()
        hidden = attention.qkv.in_features
        self.num_heads, self.head_size = attention.num_heads, hidden // attention.num_heads
        weight, bias = attention.qkv.weight.detach(), attention.qkv.bias.detach()
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        for i, linear in enumerate((self.q, self.k, self.v)):
            linear.weight.data.copy_(weight[i * hidden:(i + 1) * hidden])
            linear.bias.data.copy_(bias[i * hidden:(i + 1) * hidden])
        self.out, self.norm = attention.out, attention.norm

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        y = torch.matmul(torch.softmax(scores + additive_mask, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        y = y.view(y.shape[0], y.shape[1], self.num_heads * self.head_size)
        return self.norm(x + self.out(y))


class EagerEmbeddings(nn.Module):
    """`Embeddings` written out for export as Hugging Face's BERT computes them: position ids sliced
    from a buffer and looked up, added after the token types. Same weights; this is the form ONNX
    Runtime's optimizer fuses into one EmbedLayerNormalization kernel (which also turns the attention
    mask into the index its Attention kernels read), where `Embeddings`' slice of the position table
    was left as separate Gather, Add and LayerNormalization nodes."""

    def __init__(self, embeddings: Embeddings) -> None:
        super().__init__()
        self.word, self.position, self.token_type, self.norm = (
            embeddings.word, embeddings.position, embeddings.token_type, embeddings.norm)
        self.register_buffer("position_ids", torch.arange(embeddings.position.num_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, :input_ids.shape[1]]
        x = self.word(input_ids) + self.token_type(token_type_ids)
        return self.norm(x + self.position(positions))


class ExportedEncoder(nn.Module):
    """What the ONNX graph computes: BERT up to its deepest kept layer, then pooling, in one graph
    (one ONNX Runtime call per forward pass, and no PyTorch at run time). The embeddings, feed-forward
    blocks and pooling are `bert/modeling.py`'s and `bert/pooling.py`'s; attention is `EagerAttention`."""

    def __init__(self, model: BertModel, layers: tuple[int, ...], pooling: PoolingConfig) -> None:
        super().__init__()
        self.model, self.layers, self.pooling = model, layers, pooling
        self.embeddings = EagerEmbeddings(model.embeddings)
        self.attention = nn.ModuleList(EagerAttention(layer.attention) for layer in model.layers[:max(layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        # Token types are always an input of the graph, so sentence pairs run through the same cached graph.
        # The mask as Hugging Face's BERT builds it, once: the pattern the optimizer's mask fusion expects.
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids, token_type_ids)
        kept = {0: x} if 0 in self.layers else {}
        for i, (attention, layer) in enumerate(zip(self.attention, self.model.layers), start=1):
            x = layer.ffn(attention(x, additive_mask))
            if i in self.layers:
                kept[i] = x
        return pool([kept[i] for i in self.layers], attention_mask, self.pooling)


def fingerprint(model: BertModel, layers: tuple[int, ...], pooling: PoolingConfig) -> str:
    """A hash of everything the exported graph depends on: config, weights, layers, pooling, exporter."""
    h = hashlib.sha256()
    settings = {"config": dataclasses.asdict(model.config), "num_layers": model.num_layers,
                "layers": list(layers), "pooling": dataclasses.asdict(pooling), "opset": OPSET,
                "export_version": EXPORT_VERSION, "torch": torch.__version__}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return h.hexdigest()[:40]


def export_graph(model: BertModel, layers: tuple[int, ...], pooling: PoolingConfig) -> bytes:
    """The ONNX graph of `ExportedEncoder`, with batch size and sequence length left dynamic."""
    wrapper = ExportedEncoder(model, layers, pooling).eval()
    # Two sentences of different lengths, so nothing specialises on one length or on no padding.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    types = torch.zeros_like(ids)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes["vectors"] = {0: "batch", 1: "sequence"} if pooling.per_token else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        # dynamo=False: the TorchScript exporter needs no onnxscript and exports this model exactly.
        torch.onnx.export(wrapper, (ids, mask, types), buffer, input_names=list(INPUT_NAMES),
                          output_names=["vectors"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return fuse_transformer_ops(buffer.getvalue(), model)


def fuse_transformer_ops(graph: bytes, model: BertModel) -> bytes:
    """`graph` with attention, LayerNorm-after-residual and bias+GELU fused into ONNX Runtime's kernels
    by its transformer optimizer (pure graph rewriting, no hardware-specific steps, so the cached file
    suits any CPU). Unfused when the optimizer is missing or fails: slower, the same vectors."""
    try:
        import onnx
        from onnxruntime.transformers import optimizer

        for name in list(logging.root.manager.loggerDict):  # its modules log every fusion at INFO
            if name.startswith(("onnx_model", "fusion")):
                logging.getLogger(name).setLevel(logging.WARNING)
        fused = optimizer.optimize_model(onnx.load_from_string(graph), model_type="bert",
                                         num_heads=model.config.num_attention_heads,
                                         hidden_size=model.config.hidden_size, opt_level=0)
        counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
        log.info("ONNX graph fused: %s", ", ".join(f"{n} {op}" for op, n in counts.items()) or "nothing to fuse")
        return fused.model.SerializeToString()
    except Exception as e:  # an optimizer that does not know this graph's shape, or an older onnxruntime
        log.warning("ONNX Runtime's transformer optimizer failed (%s: %s); the graph runs unfused",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return graph


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OnnxEngine:
    """An ONNX Runtime session over the exported encoder: token batches in, pooled vectors out."""

    def __init__(self, session: Any, pad_id: int, source: str) -> None:
        self.session = session
        self.pad_id = pad_id
        self.source = source  # the cache file, or "memory" when the cache could not be written

    @classmethod
    def load(cls, model: BertModel, layers: tuple[int, ...], pooling: PoolingConfig, pad_id: int,
             cache_dir: str | None, threads: int, spin: bool = True) -> "OnnxEngine":
        """The cached graph for this model, exported first if missing or damaged. Raises when
        ONNX Runtime cannot run the model at all (the caller then keeps PyTorch)."""
        path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{fingerprint(model, layers, pooling)}.onnx"
        if path.is_file():
            try:
                engine = cls(new_session(path.read_bytes(), threads, spin), pad_id, str(path))
                engine.check_against(model, layers, pooling)
                log.info("ONNX graph from cache %s", path)
                return engine
            except Exception as e:  # a truncated or corrupted file: ONNX Runtime's errors vary
                log.warning("%s: damaged ONNX cache file (%s); exporting the model again", path,
                            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        graph = export_graph(model, layers, pooling)
        source = str(path)
        try:
            write_atomically(path, graph)
            log.info("exported the model to ONNX: %s (%.0f MB)", path, len(graph) / 1e6)
        except OSError as e:
            log.warning("cannot write the ONNX cache %s (%s); the graph is exported again at every start", path, e)
            source = "memory"
        engine = cls(new_session(graph, threads, spin), pad_id, source)
        engine.check_against(model, layers, pooling)
        return engine

    def run(self, batch: TokenBatch) -> np.ndarray:
        """One padded forward pass: float32 vectors in batch order, (n, dim) or (n, T, dim)."""
        ids, mask = batch.padded(self.pad_id)
        feed = {"input_ids": ids, "attention_mask": mask.astype(np.int64), "token_type_ids": token_types(batch, ids)}
        return self.session.run(None, feed)[0]

    def check_against(self, model: BertModel, layers: tuple[int, ...], pooling: PoolingConfig) -> None:
        """Raise if this graph's vectors for a probe batch differ from PyTorch's (a damaged file
        can still load, with wrong weights)."""
        probe = TokenBatch(np.array([101, 7592, 2088, 999, 102, 101, 2088, 102], dtype=np.int64),
                           np.array([5, 3], dtype=np.int64))
        probe = TokenBatch(probe.ids % model.config.vocab_size, probe.lengths)  # tiny test vocabularies
        ids, mask = probe.padded(self.pad_id)
        with torch.inference_mode():
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            expected = pool(model(ids_t, mask_t, keep=layers), mask_t, pooling).numpy()
        got = self.run(probe)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= PROBE_TOLERANCE:
            raise ValueError(f"the graph's vectors differ from PyTorch's by {diff:.2e}")


def token_types(batch: TokenBatch, ids: np.ndarray) -> np.ndarray:
    """Token types for the padded batch: 1 on the second sentence of a pair, else 0."""
    types = batch.padded_type_ids()
    return np.zeros_like(ids) if types is None else types


def new_session(graph: bytes, threads: int, spin: bool = True) -> Any:
    """A session on `threads` threads. `spin`: its pool threads spin after a pass, waiting for the
    next (ONNX Runtime's default). They spin for ~50 ms (a fixed count of pauses), a core busy after
    every request: on the bundled model, 2 vCPUs, one sentence 5 or 20 times a second, the server
    used 55-65 ms of CPU per request with spinning and 13-15 ms without, while its p50 went from
    6.3-9.1 ms to 8.9-13.6 ms (two runs; a sleeping thread is woken for each pass). Spinning is
    never turned off altogether: every operator would then wake its threads, 1.5x the latency."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if not spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
