"""The CPU decode step as one native call (`native/decode_cpu.cpp`), built once per machine.

The eager step spends most of its time issuing ~50 small ATen ops a layer; the native step
keeps the projections' ATen kernels and fuses everything between them into loops, so a step is
one call from Python. It is built with the machine's own instruction set (`-march=native`) by
`make setup` or on first use, into the virtual environment, keyed by the CPU's flags and the
torch version, so a node with another CPU builds its own. Where it cannot be built or the model
is not one it covers, `native_decoder` says why and the runner steps eagerly.

    python -m deployments.engine.native_step      # build now (what `make setup` runs)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from deployments.engine.fused_projections import Projection, _DenseFused, _Int4CpuFused

SOURCE = Path(__file__).parent / "native" / "decode_cpu.cpp"
STALE_LOCK_S = 600.0  # a build takes ~40 s on 2 cores
log = logging.getLogger(__name__)


class NativeUnavailable(RuntimeError):
    """The native step cannot run here (no compiler, an unsupported model): the reason."""


def machine_tag() -> str:
    """What a built extension depends on: its sources, the CPU's instruction set (it is built
    with -march=native) and torch's version (its C++ ABI)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:  # not Linux: the build is still per machine, only not shareable
        pass
    # The sources too: torch rebuilds when the .cpp changes, but not for its headers.
    sources = b"".join(f.read_bytes() for f in sorted(SOURCE.parent.iterdir()))
    return hashlib.sha256(f"{flags}|{torch.__version__}".encode() + sources).hexdigest()[:12]


def clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock older than any build takes. torch waits on the lock file for as long
    as it exists, so a build killed mid-way (Ctrl-C in `make setup`, a replica killed while
    building) would leave every later start waiting forever."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    log.warning("removing a native build lock left %.0f s ago: %s", age, lock)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def load_extension() -> ModuleType:
    """Build (or load the cached build of) the extension. Raises NativeUnavailable."""
    from torch.utils.cpp_extension import load

    name = f"awq_serve_decode_{machine_tag()}"
    build_dir = Path(sys.prefix) / "awq-serve-native" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build_dir / "lock")
    try:
        return load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:  # no compiler
        raise NativeUnavailable(f"native decode step not built: {e}") from e


def narrowest_exact(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in bf16 or fp16 where that format holds every value exactly (a checkpoint saved
    in 16 bits and loaded as fp32), else as it is."""
    for fmt in (torch.bfloat16, torch.float16):
        narrow = weight.to(fmt)
        if torch.equal(narrow.to(weight.dtype), weight):
            return narrow
    return weight


def _projection_tensors(p: Projection, ext: ModuleType) -> tuple[int, list[torch.Tensor]]:
    """(int4 group size or 0 for dense, the tensors the C++ projection takes)."""
    none = torch.empty(0)
    if isinstance(p, _Int4CpuFused):
        bias = none if p.bias is None else p.bias
        native = list(p.native) if p.native else []  # repacked by `native_int4`
        return p.group_size, [p.qweight, p.scales_and_zeros, bias, *native]
    if isinstance(p, _DenseFused):
        if p.weight.dtype != torch.float32:
            raise NativeUnavailable(f"dense weights in {p.weight.dtype}, the native step: fp32")
        packed = ext.pack_dense(narrowest_exact(p.weight))
        bias = none if p.bias is None else p.bias
        return 0, [packed, bias, torch.tensor(p.weight.shape[0])]
    raise NativeUnavailable(f"projection {type(p).__name__} has no native path")


def native_decoder(runner: Any) -> Any:
    """The C++ `Decoder` over a ModelRunner's weights and KV cache. Raises NativeUnavailable."""
    if runner.device.type != "cpu":
        raise NativeUnavailable("the native step is for CPU")
    if runner.dtype != torch.float32:
        raise NativeUnavailable(f"activations in {runner.dtype}, the native step: fp32")
    if runner.act is not torch.nn.functional.silu:
        raise NativeUnavailable("the native step computes SiLU MLPs only")
    cfg = runner.model.config
    inner = runner.model.model
    ext = load_extension()
    groups, layers = set(), []
    for i, layer in enumerate(inner.layers):
        tensors = [
            layer.input_layernorm.weight.detach(),
            layer.post_attention_layernorm.weight.detach(),
            runner.cache.k[i],
            runner.cache.v[i],
            *_qk_norms(runner, layer),
        ]
        for proj in (runner.qkv[i], runner.o_proj[i], runner.gate_up[i], runner.down[i]):
            group, parts = _projection_tensors(proj, ext)
            groups.add(group)
            tensors += [torch.tensor(len(parts)), *parts]
        layers.append(tensors)
    if len(groups) != 1:
        raise NativeUnavailable("the native step needs one kind of projection in every layer")
    dims = [
        cfg.hidden_size,
        runner.n_heads,
        runner.kv_heads,
        runner.head_dim,
        cfg.intermediate_size,
        runner.max_len,
    ]
    eps = float(cfg.rms_norm_eps)
    return ext.Decoder(layers, dims, eps, groups.pop(), inner.norm.weight.detach())


def exact_16bit_head(
    weight: torch.Tensor,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """An fp32 output projection (vocab, hidden) whose values fp16 or bf16 holds exactly, as a
    function of hidden states computed by the native dense kernel: weights read in 16 bits,
    products and sums in fp32, each logit summed over the hidden size in order (so
    batch-invariant). Demo head, one row: 1.74 ms against 5.74 for oneDNN's prepacked fp32;
    16 rows: 6.66 against 6.14. Raises NativeUnavailable where no 16-bit format is exact or the
    kernel is not built."""
    narrow = narrowest_exact(weight)
    if narrow.dtype == weight.dtype:
        raise NativeUnavailable("the lm_head's weights need fp32")
    ext = load_extension()
    packed, vocab, no_bias = ext.pack_dense(narrow), weight.shape[0], torch.empty(0)
    name = f"native {str(narrow.dtype).removeprefix('torch.')}-stored, fp32 math"
    return (lambda h: ext.dense(h.float(), packed, vocab, no_bias)), name


def _qk_norms(runner: Any, layer: nn.Module) -> list[torch.Tensor]:
    if not runner.arch.qk_norm:
        return [torch.empty(0), torch.empty(0)]
    attn = layer.self_attn
    return [attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"building the native decode step ({SOURCE.name}) ...", flush=True)
    try:
        module = load_extension()
    except NativeUnavailable as e:  # set-up goes on: the runner then steps eagerly
        print(f"{e}\nthe engine will run the eager decode step", file=sys.stderr)
        return
    print(f"built: {module.__file__}")


if __name__ == "__main__":
    main()
