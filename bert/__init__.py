"""The model side: checkpoint folders in, sentence vectors out.

- `config.py`: frozen configs (architecture, pooling, encoder options)
- `checkpoint.py`: recognises Google / Hugging Face / sentence-transformers folders; owns all weight names
- `tf_checkpoint.py`: reads TensorFlow's TensorBundle files without TensorFlow
- `tokenization.py`: WordPiece through Hugging Face `tokenizers`
- `modeling.py`: the compact BERT encoder
- `pooling.py`: hidden states to sentence vectors
- `batching.py`: length-sorted, token-budgeted batch planning
- `resolve.py`: the options a folder and the user's flags come to, without weights or torch
- `encoder.py`: `Encoder`, all of the above behind `from_dir()` and `encode()`
- `random_model.py`: randomly initialised BERT folders of any size, for benchmarks and tests
"""
from .config import BertConfig, EncoderOptions, PoolingConfig, STRATEGIES
from .errors import CheckpointError


def __getattr__(name: str):
    # Imported on first use: the broker process reads configs but never needs torch.
    if name == "Encoder":
        from .encoder import Encoder
        return Encoder
    raise AttributeError(name)

__all__ = ["BertConfig", "CheckpointError", "Encoder", "EncoderOptions", "PoolingConfig", "STRATEGIES"]
