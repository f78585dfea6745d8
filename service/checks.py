"""Start-up checks of settings that are valid but probably not what the user meant: each returns the
warnings to log, one line each. Settings that cannot work are refused earlier, by app.py's parser and
the config objects; these are the surprises that would otherwise run silently.

- `settings_warnings`: before any worker starts (the model's files are read, not its weights);
- `device_warnings`: once the workers have loaded the model and said which device they run on.
"""
from __future__ import annotations

import os
from pathlib import Path

from bert.config import effective_dtype
from bert.resolve import ResolvedEncoder

from .config import ServerConfig

# CPU instructions that run each half-precision type natively (/proc/cpuinfo flags, x86).
HALF_PRECISION_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
# Time relative to fp32 on a CPU without those instructions: the bundled model in process, 512 sentences
# of the shared data set, max_seq_len 128, 2 cores of an AMD EPYC (AVX2): fp32 175 sentences/s,
# bf16 6.2x and fp16 5.8x the time (README, "Checked at start-up").
HALF_PRECISION_CPU_SLOWDOWN = {"bf16": 6, "fp16": 6}


def settings_warnings(config: ServerConfig, resolved: ResolvedEncoder) -> list[str]:
    warnings = []
    tokenizer, options = resolved.tokenizer, config.encoder
    if not tokenizer.lowercases and tokenizer.vocab_is_uncased:
        warnings.append("lower-casing is off but the vocabulary has no upper-case tokens (an uncased model): "
                        "words with capitals become [UNK] or split badly; drop -do_lower_case false")
    if config.cpu and effective_dtype(options.dtype, "cpu") != "fp32":
        warnings.append(half_precision_on_cpu(options.dtype))
    if config.cpu and config.device_map:
        warnings.append(f"-device_map {' '.join(map(str, config.device_map))} has no effect with -cpu")
    if not options.cpu_spin and options.cpu_engine != "onnx":
        warnings.append(f"-cpu_spin no has no effect with -cpu_engine {options.cpu_engine}: it is a setting of "
                        "ONNX Runtime's threads")
    if options.mask_cls_sep and not {"mean", "max"} & set(resolved.pooling.modes):
        warnings.append(f"-mask_cls_sep has no effect with {resolved.pooling_strategy or resolved.pooling.modes}: "
                        "it only changes mean and max pooling")
    cores = os.cpu_count() or 1
    if config.cpu_threads and config.cpu_threads * config.num_worker > cores:
        warnings.append(f"-cpu_threads {config.cpu_threads} x -num_worker {config.num_worker} is more threads than "
                        f"the {cores} cores: CPU workers will slow each other down")
    elif config.cpu and config.num_worker > cores:
        warnings.append(f"-num_worker {config.num_worker} on {cores} cores: CPU workers will slow each other down")
    return warnings


def device_warnings(config: ServerConfig, devices: set[str], compute_dtype: str) -> list[str]:
    """`devices`: where the workers run ('cpu', 'cuda:0'...); `compute_dtype`: 'float32', 'float16'..."""
    warnings = []
    on_cpu = "cpu" in devices
    if on_cpu and not config.cpu and config.device_map:
        warnings.append(f"-device_map {' '.join(map(str, config.device_map))} given but no GPU is visible "
                        "(torch.cuda.is_available() is False): the workers run on the CPU")
    half = {"float16": "fp16", "bfloat16": "bf16"}.get(compute_dtype)
    if on_cpu and not config.cpu and half:  # with -cpu, settings_warnings said so before loading
        warnings.append(half_precision_on_cpu(half))
    return warnings


def half_precision_on_cpu(dtype: str) -> str:
    flags = HALF_PRECISION_CPU_FLAGS[dtype]
    if cpu_flags() & set(flags):
        return f"-dtype {dtype} on the CPU: this CPU has {'/'.join(sorted(cpu_flags() & set(flags)))}, " \
               "so it may be faster than fp32; vectors differ from fp32 by about 1e-2"
    return (f"-dtype {dtype} on a CPU without {' or '.join(flags)}: about {HALF_PRECISION_CPU_SLOWDOWN[dtype]}x "
            f"slower than fp32 (measured on an AMD EPYC) and less exact; -dtype auto uses fp32 on the CPU")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (an empty set where /proc/cpuinfo does not say)."""
    return set((cpuinfo("flags") or "").split())


def cpuinfo(field: str) -> str | None:
    """A field of the first CPU in /proc/cpuinfo ('model name', 'flags'...); None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None
