"""`Encoder`: a model folder in, a matrix of sentence vectors out.

    >>> from bert import Encoder
    >>> encoder = Encoder.from_dir()                # the bundled all-MiniLM-L6-v2
    >>> encoder.encode(["hello world", "abc"]).shape
    (2, 384)
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .batching import fits_one_pass, plan_batches
from .checkpoint import ModelFolder, inspect_folder, load_weights, weights_source
from .config import EncoderOptions, PoolingConfig, effective_dtype
from .cuda_graphs import GRAPH_BATCH_SIZES, SmallBatchGraphs
from .errors import CheckpointError
from .modeling import BertModel
from .onnx_engine import OnnxEngine
from .pooling import pool
from .resolve import resolve_encoder
from .tokenization import TokenBatch

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Padded tokens per forward pass. A GPU wants wide batches; on a CPU the cost is linear in padded
# tokens, and short passes keep padding low (2,000 sentences in 256-sentence jobs: 16% padding at 1024,
# 40% at 4096). 512 rather than 1024: the same throughput (2,000 sentences, 2 vCPUs: 333-355/s against
# 332-352/s; 256 and 128 lost 4% and 7%), and a query that reaches a worker busy with bulk work, which
# waits for the pass in progress, waited 64 ms instead of 135 ms (p50).
DEFAULT_BATCH_TOKENS = {"cpu": 512, "cuda": 65536}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    return _TORCH_DTYPES[effective_dtype(dtype, device.type)]


def _nothing() -> None:
    pass


def forward_padded(model: BertModel, layers: tuple[int, ...], pooling: PoolingConfig, ids: torch.Tensor,
                   mask: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
    """The model and pooling over a padded batch already on the device: (B, dim) float32 vectors."""
    return pool(model(ids, mask, keep=layers, token_type_ids=types), mask, pooling)


class Encoder:
    """Tokenizer, truncated BERT and pooling, ready to turn sentences into vectors."""

    def __init__(self, folder: ModelFolder, options: EncoderOptions) -> None:
        self.folder = folder
        self.options = options
        resolved = resolve_encoder(options, folder)
        self.pooling, self.layers = resolved.pooling, resolved.layers
        self.max_seq_len, self.tokenizer = resolved.max_seq_len, resolved.tokenizer
        self.pooling_strategy = resolved.pooling_strategy
        self.device = torch.device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.max_batch_tokens = options.max_batch_tokens or DEFAULT_BATCH_TOKENS.get(self.device.type, 512)
        self.model = self._build_model(max(self.layers))
        self.onnx = self._build_onnx_engine() if self._runs_onnx() else None
        # Urgent batches (queries) run here on a GPU: its scheduler starts their kernels' blocks ahead of
        # those of work queued on other streams, such as a bulk window's passes (see `encode_tokens`).
        self.query_stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self.graphs = self._capture_graphs() if self.device.type == "cuda" and options.cuda_graphs else None

    def _build_model(self, num_layers: int) -> BertModel:
        weights = load_weights(self.folder, num_layers)
        model = BertModel(self.folder.config, num_layers=num_layers)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{weights_source(self.folder)}: weights do not fit the config: {e}") from None
        return model.to(device=self.device, dtype=self.dtype).eval()

    def _runs_onnx(self) -> bool:
        # ONNX Runtime runs the fp32 graph only: bf16 on a CPU (and every GPU) stays with PyTorch.
        return (self.options.cpu_engine == "onnx" and self.device.type == "cpu"
                and self.dtype == torch.float32)

    def _build_onnx_engine(self) -> OnnxEngine | None:
        """The ONNX Runtime engine, or None (PyTorch then runs the model) when it cannot be built."""
        try:
            return OnnxEngine.load(self.model, self.layers, self.pooling, self.tokenizer.pad_id,
                                   self.options.onnx_cache_dir, torch.get_num_threads(), self.options.cpu_spin)
        except Exception as e:  # onnxruntime missing, an export failure, a graph over 2 GB...
            log.warning("ONNX Runtime cannot run this model (%s: %s); running it with PyTorch",
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            return None

    def _capture_graphs(self) -> SmallBatchGraphs | None:
        """CUDA graphs for small batches (bert/cuda_graphs.py), or None (eager passes) when capture fails."""
        # The graphs hold the model, not this encoder: no reference cycle, so a dropped encoder's graphs
        # go at once, not in a garbage collection during another encoder's capture.
        run = functools.partial(forward_padded, self.model, self.layers, self.pooling)
        graphs = SmallBatchGraphs(run, self.query_stream, self.max_seq_len, self.tokenizer.pad_id,
                                  self.pooling.per_token)
        try:
            with torch.inference_mode():
                seconds = graphs.capture_all()
        except Exception as e:  # an operator that cannot be captured, out of memory...
            log.warning("CUDA graphs for small batches could not be captured (%s: %s); small batches run "
                        "eagerly", type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            return None
        log.info("captured %d CUDA graphs for small batches (up to %d sentences of up to %d tokens) in %.1f s",
                 len(graphs.graphs), graphs.batch_sizes[-1], graphs.lengths[-1], seconds)
        return graphs

    @property
    def engine(self) -> str:
        """What runs the forward passes: 'onnxruntime' or 'torch'."""
        return "onnxruntime" if self.onnx is not None else "torch"

    @classmethod
    def from_dir(cls, model_dir: str | None = None, **options: Any) -> "Encoder":
        """Build from a Google, Hugging Face or sentence-transformers folder (None: the bundled model).

        Keyword options are the fields of `EncoderOptions` (pooling_strategy, pooling_layer, ...).
        """
        return cls.from_options(EncoderOptions(model_dir=model_dir, **options))

    @classmethod
    def from_options(cls, options: EncoderOptions) -> "Encoder":
        return cls(inspect_folder(options.model_dir), options)

    @property
    def dim(self) -> int:
        """Length of a sentence vector (or of a token vector with pooling NONE)."""
        per_mode = self.folder.config.hidden_size * len(self.layers)
        return per_mode * (1 if self.pooling.per_token else len(self.pooling.modes))

    def describe(self) -> dict[str, Any]:
        """What is being served, for logs and the client's `server_config()`."""
        return {
            "model_dir": str(self.folder.path), "model_kind": self.folder.kind,
            "num_layers_run": self.model.num_layers, "num_hidden_layers": self.folder.config.num_hidden_layers,
            "hidden_size": self.folder.config.hidden_size, "dim": self.dim,
            "pooling_strategy": self.pooling_strategy, "pooling_modes": list(self.pooling.modes),
            "pooling_layer": list(self.pooling.layers), "do_lower_case": self.tokenizer.lowercases,
            "mask_cls_sep": self.pooling.mask_cls_sep, "normalize": self.pooling.normalize,
            "max_seq_len": self.max_seq_len, "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "max_batch_tokens": self.max_batch_tokens,
            "engine": self.engine, "cuda_graphs": self.graphs is not None,
        }

    # ------------------------------------------------------------ encoding

    def tokenize(self, texts: Sequence, is_tokenized: bool = False) -> TokenBatch:
        """Sentences (an item may be a pair [A, B]), or with `is_tokenized` lists of WordPieces."""
        if is_tokenized:
            return self.tokenizer.encode_pretokenized(texts)  # type: ignore[arg-type]
        return self.tokenizer.encode(texts)

    @torch.inference_mode()
    def forward(self, batch: TokenBatch, graphs: bool = False) -> torch.Tensor:
        """One padded forward pass over `batch`: float32 vectors on the encoder's device, in batch order.
        `graphs`: a small batch may be a CUDA graph's replay, for callers on `query_stream` only (the
        urgent batches of `encode_tokens`): the graphs' buffers are shared, so replays on two streams
        could overwrite each other's inputs.

        On a GPU this returns as soon as the work is queued, so the caller can prepare the next batch
        while the device computes this one.
        """
        input_ids, mask = batch.padded(self.tokenizer.pad_id)
        type_ids = batch.padded_type_ids()  # None unless a sentence pair is in the batch
        if graphs and type_ids is None and self.graphs is not None and self.graphs.fits(*input_ids.shape):
            return self.graphs.replay(input_ids, mask)
        ids_t = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
        types_t = None if type_ids is None else torch.from_numpy(type_ids).to(self.device, non_blocking=True)
        return forward_padded(self.model, self.layers, self.pooling, ids_t, mask_t, types_t)

    def encode_tokens(self, batch: TokenBatch, on_pass: Callable[[], object] = _nothing,
                      urgent: bool | None = None) -> np.ndarray:
        """Vectors for tokenized sentences, in their order: (n, dim), or (n, T, dim) for NONE.

        When the device runs out of memory, the same sentences are encoded again in passes of half
        as many tokens, down to one sentence a pass; the vectors do not depend on how they were batched.
        `on_pass()` is called as each forward pass of a batch split into several finishes (a worker's
        stall clock: a window of many passes is long, but it moves).

        `urgent`: a query's batch, which other work on the device is not to hold up (default: a batch
        of at most as many sentences as the largest CUDA graph holds). On a GPU an urgent batch runs
        on `query_stream`, so a worker's query is not queued behind the passes of the bulk window
        another thread runs on the default stream, and it alone replays CUDA graphs: the graphs'
        inputs are fixed buffers, so their replays must follow each other on one stream. On a CPU
        `urgent` changes nothing.
        """
        if urgent is None:
            urgent = len(batch) <= GRAPH_BATCH_SIZES[-1]
        if not urgent or self.query_stream is None:
            return self._encode_shrinking_on_oom(batch, on_pass, graphs=False)
        with torch.cuda.stream(self.query_stream):  # this thread's current stream, until the vectors are back
            return self._encode_shrinking_on_oom(batch, on_pass, graphs=True)

    def _encode_shrinking_on_oom(self, batch: TokenBatch, on_pass: Callable[[], object], graphs: bool) -> np.ndarray:
        budget = self.max_batch_tokens
        longest = int(batch.lengths.max()) if len(batch) else 0
        while True:
            try:
                return self._encode_in_passes(batch, budget, on_pass, graphs)
            except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError too
                if not is_out_of_memory(e) or budget <= longest:
                    raise
                log.warning("out of memory in passes of %d tokens; encoding again in passes of %d "
                            "(lower -max_batch_tokens if this repeats): %s", budget, budget // 2,
                            str(e).splitlines()[0][:200])
            # Out here the exception and its traceback are gone, and the failed pass's tensors with them.
            self._release_cached_memory()
            budget //= 2

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def vectors(self, batch: TokenBatch, graphs: bool = False) -> np.ndarray:
        """One forward pass over `batch`, as float32 numpy vectors in batch order."""
        if self.onnx is not None:
            return self.onnx.run(batch)
        return self.forward(batch, graphs).cpu().numpy()  # waits for this thread's current stream

    def _encode_in_passes(self, batch: TokenBatch, max_tokens: int, on_pass: Callable[[], object] = _nothing,
                          graphs: bool = False) -> np.ndarray:
        n = len(batch)
        if n == 1 or (n and fits_one_pass(batch.lengths, max_tokens)):
            # Fast path (one sentence per query is the common case): one pass in the batch's own
            # order, so no sorting, gathering or scattering into a second array.
            return self.vectors(batch, graphs)
        width = int(batch.lengths.max()) if n else 0
        shape = (n, width, self.dim) if self.pooling.per_token else (n, self.dim)
        out = np.zeros(shape, dtype=np.float32)
        start = time.perf_counter()
        plan = plan_batches(batch.lengths, max_tokens)
        # Queue every forward pass first and copy results back after: one sync per call, not per batch.
        # A CPU pass is over when `run` returns; a GPU's when its copy back is (`run` returns at once,
        # or, once CUDA's queue is full, when an earlier pass is done: progress either way).
        run = self.onnx.run if self.onnx is not None else functools.partial(self.forward, graphs=graphs)
        on_gpu = self.device.type != "cpu"
        results = []
        for index in plan:
            results.append(run(batch.take(index)))
            on_pass()
        for index, vectors in zip(plan, results):
            if isinstance(vectors, torch.Tensor):
                vectors = vectors.cpu().numpy()
                if on_gpu:
                    on_pass()
            if self.pooling.per_token:
                out[index, :vectors.shape[1]] = vectors
            else:
                out[index] = vectors
        if log.isEnabledFor(logging.DEBUG) and n:
            real = int(batch.lengths.sum())
            padded = sum(len(index) * int(batch.lengths[index].max()) for index in plan)
            log.debug("encoded %d sentences in %d passes: %d tokens + %.1f%% padding, %.0f ms", n, len(plan),
                      real, 100 * (padded - real) / real, 1000 * (time.perf_counter() - start))
        return out

    def encode(self, texts: Sequence, is_tokenized: bool = False) -> np.ndarray:
        """Sentence vectors as float32, shape (len(texts), dim); (n, T, dim) for pooling NONE.
        An item may be a sentence pair [A, B]: [CLS] A [SEP] B [SEP], token type 1 for B."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        return self.encode_tokens(self.tokenize(texts, is_tokenized))


def is_out_of_memory(error: BaseException) -> bool:
    """The device (CUDA's caching allocator) or the host (a failed CPU allocation) had no memory left."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
