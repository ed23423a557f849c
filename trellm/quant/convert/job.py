"""The conversion job: unquantized model folder -> EXL3 folder, one decoder layer at a time, resumable.

For each layer (QUANTIZER.md, pipeline): run the calibration states through the ORIGINAL
layer collecting each linear's input Hessian (q/k/v and gate/up share theirs), quantize the
layer's linears, then run the states through the QUANTIZED layer to feed the next one. The
head comes last, with its own bit width, from the final norm's output.

WORKDIR holds the job: job.json (arguments and progress), the calibration token ids, the
hidden states after the last checkpointed layer, and one safetensors file per checkpointed
layer. Checkpoints come after the last layer, on Ctrl-C and otherwise at most once a minute
(the states are large). Each file is written to a temporary name and renamed, and job.json
is updated last, so a crash at any moment resumes (`resume=True`) from the last checkpoint
and produces output identical to an uninterrupted run: every random choice derives from the
seed and the layer's position, not from a running generator.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trellm.cache.contiguous import ContiguousKVCache
from trellm.errors import ConfigError, TrellmError
from trellm.io.hf_folder import read_model_config
from trellm.io.safetensors import CheckpointReader
from trellm.io.safetensors_writer import ShardedWriter, atomic_folder, write_json
from trellm.io.tokenizer import Tokenizer
from trellm.layers.linear import Linear
from trellm.models.decoder import DecoderModel
from trellm.models.loader import load_model
from trellm.quant import exl3_format as fmt
from trellm.quant.convert.bits import LinearSlot, allocate_bits, allocate_measured, average_bits
from trellm.quant.convert.calibration import calibration_rows, text_row_count
from trellm.quant.convert.quantize import CHANNEL_SCALES, LinearJob, quantize_linear, quantize_linears
from trellm.quant.convert.sensitivity import COLS, ROWS, linear_sensitivities
from trellm.quant.exl3 import EXL3Linear, round_up
from trellm.quant.exl3_writer import WRITER_VERSION, linear_tensors

log = logging.getLogger(__name__)

ALLOCATIONS = ("heuristic", "measured")
JOB_VERSION = 2  # 2: TF32 calibration passes, wider global-scale search (layers differ from version 1's)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja", "chat_template.json")


class ConvertError(TrellmError):
    """The conversion cannot start or continue (bad arguments, a WORKDIR from another job...)."""


@dataclass
class ConvertArgs:
    input: str
    output: str
    workdir: str
    bpw: float
    head_bits: int = 6
    codebook: str = "mul1"
    calibration: str | None = None
    rows: int = 250
    cols: int = 2048
    seed: int = 0
    shard_bytes: int = 8 * 2**30
    tf32: bool = True  # calibration forwards and Hessians on TF32 tensor cores (GPU)
    channel_scales: str = "both"  # quantize.channel_scales
    allocation: str = "measured"  # bits.allocate_measured, or bits.allocate_bits ("heuristic")

    def __post_init__(self) -> None:
        if not 1.0 <= float(self.bpw) <= 8.0:
            raise ConfigError(f"bits per weight must be between 1 and 8, got {self.bpw}")
        if not 1 <= int(self.head_bits) <= 8:
            raise ConfigError(f"head bits must be 1..8, got {self.head_bits}")
        if self.codebook not in fmt.CODEBOOKS:
            raise ConfigError(f"unknown codebook {self.codebook!r}; choose one of {', '.join(fmt.CODEBOOKS)}")
        if self.channel_scales not in CHANNEL_SCALES:
            raise ConfigError(f"unknown channel scales {self.channel_scales!r}; choose one of "
                              f"{', '.join(CHANNEL_SCALES)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.rows < 1 or self.cols < 2:
            raise ConfigError(f"calibration needs rows >= 1 and cols >= 2, got {self.rows} × {self.cols}")

    def identity(self) -> dict[str, Any]:
        """What must match for a WORKDIR to be resumed (output location may change)."""
        d = dataclasses.asdict(self)
        d.pop("output")
        d.pop("workdir")
        d["input"] = str(Path(self.input).resolve())
        if d["channel_scales"] == "both":
            del d["channel_scales"]  # the only choice before the option existed: older jobs still resume
        if d["allocation"] == "heuristic":
            del d["allocation"]  # the only choice before the option existed: older jobs resume with it
        if self.calibration:
            d["calibration_sha256"] = hashlib.sha256(Path(self.calibration).read_bytes()).hexdigest()
        return d


Progress = Callable[[dict[str, Any]], None]


# ---- small file helpers ------------------------------------------------------------------------------

def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class _Checkpointer:
    """Writes a checkpoint (finished layers' tensors, the calibration states, then job.json) on a background
    thread while the next layer quantizes. One checkpoint at a time, in order, each file atomic (the job
    only counts a layer once job.json says so). A failed write is raised by the next call.

    The files hold the tensors as they are at the call; callers never change them in place afterwards
    (each layer makes new states), so GPU tensors are copied on a side stream, after the work that made
    them, into reused pinned buffers. Copying an 8B model's 8.4 GB of states into pageable memory in the
    caller's thread held the next layer up by seconds (H200); now the copy overlaps it."""

    PINNED_MIN_BYTES = 1 << 26  # smaller tensors go to pageable memory

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pinned: dict[tuple[Path, str], torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None

    def _host(self, path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.nbytes < self.PINNED_MIN_BYTES:
            return torch.empty(t.shape, dtype=t.dtype)
        buf = self._pinned.get((path, key))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._pinned[(path, key)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf

    def write(self, files: dict[Path, dict[str, torch.Tensor]], state: dict[str, Any], job_file: Path) -> None:
        self.wait()
        on_gpu = [t for tensors in files.values() for t in tensors.values() if t.is_cuda]
        if on_gpu:
            if self._stream is None:
                self._stream = torch.cuda.Stream(on_gpu[0].device)
            ready = torch.cuda.current_stream(on_gpu[0].device).record_event()
            for t in on_gpu:
                t.record_stream(self._stream)  # the allocator must not reuse them before the copy is done
        files = {path: {k: v if v.is_cuda else v.detach().to("cpu", copy=True).contiguous() for k, v in t.items()}
                 for path, t in files.items()}
        text = json.dumps(state, indent=2) + "\n"

        def run() -> None:
            try:
                cpu = files
                if on_gpu:
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(ready)
                        cpu = {path: {k: self._host(path, k, v).copy_(v.detach(), non_blocking=True) if v.is_cuda
                                      else v for k, v in t.items()} for path, t in files.items()}
                    self._stream.synchronize()
                for path, tensors in cpu.items():
                    _atomic_save(tensors, path)
                tmp = job_file.with_name(job_file.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, job_file)
            except BaseException as e:  # handed to the main thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="trellm-checkpoint")
        self._thread.start()

    def wait(self, *, quiet: bool = False) -> None:
        """Until the checkpoint being written is on disk; raises its error unless quiet."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not quiet:
            error, self._error = self._error, None
            raise ConvertError(f"could not write the conversion checkpoint: {error}") from error


# ---- the model's linears -------------------------------------------------------------------------------

def _layer_linears(layer) -> list[Linear]:
    return [m for m in layer.modules() if isinstance(m, Linear)]


def _slots(model: DecoderModel) -> list[LinearSlot]:
    return [LinearSlot(lin.name, i, round_up(lin.in_features, 128) * round_up(lin.out_features, 128))
            for i, layer in enumerate(model.layers) for lin in _layer_linears(layer)]


def input_key(name: str) -> str:
    """Which input a linear reads, by its name: q/k/v read one, gate/up another (they share a Hessian)."""
    leaf = name.rsplit(".", 1)[1]
    return {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"
            }.get(leaf, leaf)


def _seed(base: int, layer: int, index: int) -> int:
    return (base * 1_000_003 + layer * 9_973 + index * 101) % (2**31 - 1)


# ---- calibration forward passes -----------------------------------------------------------------------

@contextlib.contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    """float32 matmuls on TF32 tensor cores inside (GPU). The calibration passes of an 8B layer over
    250 × 2048 tokens are ~5e14 flops (forward + Hessians): ~10 s in float32 on an H100/H200, a few
    seconds in TF32, whose rounding (10-bit mantissa products, float32 sums) is far below the
    quantization error those passes measure. Not used for the rotations and LDLQ."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _layer_forward(model: DecoderModel, idx: int, states: torch.Tensor, batch: int,
                   hooks: dict[str, Callable[[torch.Tensor], None]] | None = None,
                   into: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
    """Run calibration states [R, C, hidden] through layer idx (in row batches); hooks see each linear's input.

    Returns (outputs, None), or with `into` = an earlier pass's outputs: those are compared with this pass's
    and overwritten by them, returning (into, relative Frobenius error). Writing over the reference keeps
    two state-sized buffers alive instead of three (8.4 GB each for an 8B model's 250 × 2048 rows)."""
    layer = model.layers[idx]
    handles = []
    for lin in _layer_linears(layer):
        if hooks and lin.name in hooks:
            fn = hooks[lin.name]
            handles.append(lin.register_forward_pre_hook(lambda mod, args, fn=fn: fn(args[0])))
    rows, cols, _ = states.shape
    out = torch.empty_like(states) if into is None else into
    positions = torch.arange(cols, device=states.device)[None]
    rotary = model.rotary[layer.layer_type]
    diff_sq = torch.zeros((), dtype=torch.float64, device=states.device)
    ref_sq = torch.zeros((), dtype=torch.float64, device=states.device)
    try:
        with torch.no_grad():
            for r0 in range(0, rows, batch):
                h = states[r0 : r0 + batch]
                cache = ContiguousKVCache(model.config, batch_size=h.shape[0], max_len=cols, device=h.device,
                                          dtype=h.dtype)
                cos, sin = rotary.cos_sin(positions.expand(h.shape[0], -1), cols, h.dtype)
                y = layer(h, cos, sin, cache.step(cols))
                if into is not None:
                    ref = into[r0 : r0 + batch]
                    diff_sq += (y - ref).double().square().sum()
                    ref_sq += ref.double().square().sum()
                out[r0 : r0 + batch] = y
    finally:
        for hd in handles:
            hd.remove()
    if into is None:
        return out, None
    return out, float(diff_sq.sqrt() / ref_sq.sqrt().clamp_min(1e-30))


def _probe_passes(model: DecoderModel, batch: int) -> tuple[Callable, Callable]:
    """The probe's float32 passes over a model held in 16 bits: run_layer(i, h) (layer i turned float32 for
    the pass and back after it) and logprobs(h) (final norm, head and soft-capping, as the model's forward)."""
    holding = model.embed_weight.dtype  # what the layers wait in (job._holding_dtype)
    head = model.lm_head.impl.dense_weight().float()
    norm = copy.deepcopy(model.norm).float()
    cap = model.config.final_logit_softcapping

    def run_layer(i: int, h: torch.Tensor) -> torch.Tensor:
        layer = model.layers[i].float()
        try:
            return _layer_forward(model, i, h, batch)[0]
        finally:
            layer.to(holding)

    def logprobs(h: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(norm(h), head)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    return run_layer, logprobs


def _sensitivities(model: DecoderModel, ids: torch.Tensor, args: ConvertArgs, batch: int) -> dict[str, float]:
    """sensitivity.linear_sensitivities on the first calibration rows (text, not random tokens), float32."""
    rows = ids[: min(ROWS, text_row_count(ids.shape[0])), :COLS]
    run_layer, logprobs = _probe_passes(model, batch)
    with torch.no_grad():
        states = model.embed(rows.to(model.device), dtype=torch.float32)
    return linear_sensitivities([_layer_linears(layer) for layer in model.layers], states, run_layer, logprobs,
                                mode=args.channel_scales, seed=args.seed)


class _Hessian:
    """Σ xᵀx over all tokens (float64), then the mean: the input statistics LDLQ weighs errors by."""

    def __init__(self, k: int, device: torch.device):
        self.sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).double()
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def _holding_dtype(raw_config: dict[str, Any], device: str | None) -> str:
    """The dtype the model waits in: its checkpoint's 16-bit dtype on a GPU, else float32 (the default)."""
    stored = raw_config.get("torch_dtype") or raw_config.get("dtype")
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return stored if stored in ("float16", "bfloat16") and not on_cpu else "float32"


def _install(lin: Linear, q, device: torch.device) -> dict[str, torch.Tensor]:
    """Swap a Linear's dense weights for the quantized ones; return the tensors to store."""
    bias = lin.impl.bias if getattr(lin.impl, "bias", None) is not None else None
    impl = EXL3Linear(lin.in_features, lin.out_features, bias is not None)
    impl.set_tensors(q.trellis, suh=q.suh, svh=q.svh, codebook=q.codebook, bias=bias, name=lin.name, device=device)
    lin.impl = impl
    return linear_tensors(lin.name, q.trellis, q.suh, q.svh, q.codebook, impl.bias)


# ---- the job ------------------------------------------------------------------------------------------

def convert(args: ConvertArgs, *, resume: bool = False, force: bool = False, device: str | None = None,
            batch: int = 8, progress: Progress | None = None, checkpoint_interval: float = 60.0) -> Path:
    """Convert args.input to an EXL3 folder at args.output; returns the output path.

    The calibration states are checkpointed at most every `checkpoint_interval` seconds (0: after every
    layer), with the layers finished since the last checkpoint, and always after the last layer and on
    Ctrl-C. A 4096-wide model's states are 8.4 GB of float32 per checkpoint (250 × 2048 rows): writing
    them after every 15-second layer held an 8B conversion up ~3 s per layer. A hard crash loses at most
    the interval's layers, which a resume recomputes identically."""
    src, work, out = Path(args.input), Path(args.workdir), Path(args.output)
    if not (src / "config.json").exists():
        raise ConvertError(f"{src} is not a model folder (no config.json); pass the unquantized model's folder")
    raw_config = read_model_config(src)
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method", "?")
        raise ConvertError(f"{src} is already quantized ({method}); convert the unquantized original")
    job_file = work / "job.json"
    work.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"version": JOB_VERSION, "args": args.identity(), "finished": 0, "layer_stats": []}
    if job_file.exists():
        saved = json.loads(job_file.read_text())
        if not resume:
            raise ConvertError(f"{work} already holds a conversion job; pass -r/--resume to continue it, or choose "
                               "an empty work folder")
        if saved.get("version") != JOB_VERSION:
            raise ConvertError(f"{work} holds a job of converter version {saved.get('version')} (this trellm writes "
                               f"version {JOB_VERSION}, whose layers differ): start again in a new work folder")
        if saved.get("args") != state["args"] and not force:
            diff = sorted(k for k in set(saved.get("args", {})) | set(state["args"])
                          if saved.get("args", {}).get(k) != state["args"].get(k))
            raise ConvertError(f"{work} was started with different arguments ({', '.join(diff)}); resume with the "
                               "same arguments, pass --force-resume to continue anyway, or use a new work folder")
        state = saved
    elif resume and any(work.iterdir()):
        raise ConvertError(f"{work} has files but no job.json: it is not a trellm conversion folder")
    else:
        _atomic_json(state, job_file)  # the folder is this job's from now on, checkpoint or not

    t_start = time.perf_counter()
    # The model is held in its checkpoint's 16-bit dtype on a GPU (float32 on a CPU); each layer turns
    # float32 when its turn comes, and the calibration states are float32 throughout.
    model = load_model(src, device=device, dtype=_holding_dtype(raw_config, device), fuse=False)
    dev = model.device
    cfg = model.config
    slots = _slots(model)
    tokenizer = Tokenizer.from_folder(src)
    t_loaded = time.perf_counter()

    ids_file = work / "calibration.safetensors"
    if ids_file.exists():
        ids = load_file(str(ids_file))["ids"]
    else:
        with _matmul_tf32(args.tf32):  # generating the rows is a forward pass per token as well
            ids = calibration_rows(model, tokenizer, rows=args.rows, cols=args.cols, text_file=args.calibration,
                                   seed=args.seed)
        _atomic_save({"ids": ids}, ids_file)
    t_calibrated = time.perf_counter()
    if args.allocation == "measured":
        if "sensitivity" not in state:  # measured once, kept in job.json: a resumed job allocates the same
            with _matmul_tf32(args.tf32):
                state["sensitivity"] = _sensitivities(model, ids, args, batch)
            _atomic_json(state, job_file)
        bits = allocate_measured(slots, float(args.bpw), state["sensitivity"])
    else:
        bits = allocate_bits(slots, float(args.bpw), cfg.num_layers)
    t_allocated = time.perf_counter()
    states_file = work / "states.safetensors"
    done = int(state["finished"])
    if done:
        states = load_file(str(states_file))["states"].to(dev)
        log.info("resuming after layer %d of %d", done, cfg.num_layers)
    else:
        with torch.no_grad():
            states = model.embed(ids.to(dev), dtype=torch.float32)  # [R, C, hidden]
    if progress:
        progress({"layer": "setup", "num_layers": cfg.num_layers, "resumed_after": done,
                  "stages": {"load": round(t_loaded - t_start, 2), "calibration": round(t_calibrated - t_loaded, 2),
                             "allocation": round(t_allocated - t_calibrated, 2),
                             "states": round(time.perf_counter() - t_allocated, 2)},
                  "widths": dict(sorted(collections.Counter(bits.values()).items())),
                  "elapsed": time.perf_counter() - t_start})

    checkpoint = _Checkpointer()
    last_wait = 0.0  # seconds the previous checkpoint held the loop up (waiting for the one before + copies)
    last_checkpoint = time.perf_counter()
    # The job after its last finished layer, replaced in one assignment so that Ctrl-C never sees half of
    # it: (job state, the states that layer output, finished layers' tensors not yet on disk).
    finished: tuple[dict[str, Any], torch.Tensor, dict[Path, dict[str, torch.Tensor]]] = (state, states, {})

    def save() -> None:
        nonlocal finished, last_checkpoint
        job_state, out_states, unsaved = finished
        checkpoint.write(unsaved | {states_file: {"states": out_states}}, job_state, job_file)
        finished, last_checkpoint = (job_state, out_states, {}), time.perf_counter()

    try:
        for idx in range(done, cfg.num_layers):
            t0 = time.perf_counter()
            layer = model.layers[idx]
            linears = _layer_linears(layer)
            hessians: dict[str, _Hessian] = {}
            hooks: dict[str, Callable] = {}
            for lin in linears:  # q/k/v read one input, gate/up another: one Hessian each
                key = input_key(lin.name)
                if key not in hessians:
                    hessians[key] = _Hessian(lin.in_features, dev)
                    hooks[lin.name] = hessians[key].add
            layer.float()  # the model waits in its 16-bit dtype (an 8B model in float32 takes 32 GB)
            with _matmul_tf32(args.tf32):
                reference, _ = _layer_forward(model, idx, states, batch, hooks)
            t1 = time.perf_counter()
            tensors: dict[str, torch.Tensor] = {}
            proxies = {}
            jobs = [LinearJob(lin.impl.dense_weight(), hessians[input_key(lin.name)].mean(), bits[lin.name],
                              _seed(args.seed, idx, j)) for j, lin in enumerate(linears)]
            quantized = quantize_linears(jobs, codebook=args.codebook, channel_scales=args.channel_scales)
            for lin, q in zip(linears, quantized):
                proxies[lin.name.rsplit(".", 1)[1]] = q.proxy_error
                tensors |= _install(lin, q, dev)
            del jobs, quantized
            t2 = time.perf_counter()
            with _matmul_tf32(args.tf32):
                states, err = _layer_forward(model, idx, states, batch, into=reference)
            t3 = time.perf_counter()
            stats = {"layer": idx, "bits": {n.rsplit(".", 1)[1]: bits[n] for n in (lin.name for lin in linears)},
                     "proxy": proxies, "rel_error": err, "seconds": round(t3 - t0, 2),
                     "stages": {"hessians": round(t1 - t0, 2), "quantize": round(t2 - t1, 2),
                                "forward": round(t3 - t2, 2), "checkpoint_wait": round(last_wait, 2)}}
            state = {**state, "finished": idx + 1,
                     "layer_stats": [s for s in state["layer_stats"] if s["layer"] != idx] + [stats]}
            finished = (state, states, finished[2] | {work / f"layer_{idx:04d}.safetensors": tensors})
            t4 = time.perf_counter()
            if idx + 1 == cfg.num_layers or t4 - last_checkpoint >= checkpoint_interval:
                save()
            last_wait = time.perf_counter() - t4
            if progress:
                progress({**stats, "num_layers": cfg.num_layers, "elapsed": time.perf_counter() - t_start})
    except BaseException as stop:
        checkpoint.wait(quiet=True)  # a crash leaves the last checkpoint on disk
        if isinstance(stop, KeyboardInterrupt) and finished[2]:
            save()  # Ctrl-C keeps every finished layer; the interrupted layer's partial work is dropped
            checkpoint.wait(quiet=True)
        raise
    checkpoint.wait()
    head_file = work / "head.safetensors"
    if not head_file.exists():
        hessian = _Hessian(cfg.hidden_size, dev)
        model.norm.float()
        with torch.no_grad(), _matmul_tf32(args.tf32):
            for r0 in range(0, states.shape[0], batch):
                hessian.add(model.norm(states[r0 : r0 + batch]))
        q = quantize_linear(model.lm_head.impl.dense_weight().float(), hessian.mean(), int(args.head_bits),
                            codebook=args.codebook, seed=_seed(args.seed, cfg.num_layers, 0),
                            channel_scales=args.channel_scales)
        _atomic_save(linear_tensors("lm_head", q.trellis, q.suh, q.svh, q.codebook), head_file)
        state["head"] = {"bits": int(args.head_bits), "proxy": q.proxy_error}
        _atomic_json(state, job_file)
        if progress:
            progress({"layer": "head", "num_layers": cfg.num_layers, "proxy": {"lm_head": q.proxy_error},
                      "elapsed": time.perf_counter() - t_start})

    _write_output(args, src, out, work, raw_config, model, slots, bits, state)
    log.info("converted %s -> %s in %.1f s", src, out, time.perf_counter() - t_start)
    return out


def _write_output(args: ConvertArgs, src: Path, out: Path, work: Path, raw_config: dict[str, Any],
                  model: DecoderModel, slots: list[LinearSlot], bits: dict[str, int], state: dict[str, Any]) -> None:
    reader = CheckpointReader(src)
    linear_names = {s.name for s in slots} | {"lm_head"}
    fused = set(model.spec.fused)

    def is_linear_tensor(name: str) -> bool:
        prefix = name.rsplit(".", 1)[0]
        return prefix in linear_names or any(prefix.endswith("." + f) for f in fused)

    qc = {"quant_method": "exl3", "version": WRITER_VERSION, "bits": round(average_bits(slots, bits), 4),
          "head_bits": int(args.head_bits), "calibration": {"rows": args.rows, "cols": args.cols},
          "out_scales": "always", "codebook": args.codebook}
    config = dict(raw_config)
    if config.get("quantization_config"):
        config["original_quantization_config"] = config["quantization_config"]
    config["quantization_config"] = qc
    config["tie_word_embeddings"] = False  # the format always stores a quantized lm_head
    with atomic_folder(out, overwrite=True) as tmp:
        writer = ShardedWriter(tmp, shard_bytes=args.shard_bytes)
        for name in reader.names():  # embeddings, norms: copied unchanged, in the source dtype
            if not is_linear_tensor(name):
                writer.add(name, reader.get(name))
        for idx in range(model.config.num_layers):
            for name, t in load_file(str(work / f"layer_{idx:04d}.safetensors")).items():
                writer.add(name, t)
        for name, t in load_file(str(work / "head.safetensors")).items():
            writer.add(name, t)
        writer.finish()
        write_json(tmp / "config.json", config)
        write_json(tmp / "quantization_config.json", {**qc, "channel_scales": args.channel_scales,
                                                      "allocation": args.allocation,
                                                      "sensitivity": state.get("sensitivity"),
                                                      "layers": state.get("layer_stats", []),
                                                      "head": state.get("head")})
        for name in COPIED_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
