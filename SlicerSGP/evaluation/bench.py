"""`sgp bench`: our engine against SAM2's own video predictor on the same volume and weights.

(a) ``SAM2VideoPredictor`` (the sam2 package, unchanged): the labeled slices as mask prompts,
    propagated forward from the first and backward from the last, as training-free SAM2 tools do.
(b) ``Segmenter`` (training-free, bidirectional, PMA on), model already loaded, cache empty.

Both run in one process, one after the other, on the same model input; stage times come from
forward hooks on the same SAM2 modules on both sides, so they are measured the same way.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import sam2.sam2_video_predictor as vp
import torch
from sam2.build_sam import build_sam2_video_predictor
from torch.utils.flop_counter import FlopCounterMode

from SlicerSGP.data import preprocess
from SlicerSGP.types import SegmentOptions
from SlicerSGP.weights import resolve_model_name

STAGES = ("encode", "memory_attention", "decode", "memory_encode", "write_back")


class PeakRSS:
    """Samples this process's resident memory in a thread; peak above the starting level."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def above_base(self) -> int:
        return self.peak - self.base


@dataclass
class Measurement:
    name: str
    wall: float = 0.0
    peak_host: int = 0
    peak_device: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    encodes: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    """Calls of each timed SAM2 module (image encoder, memory attention, mask decoder, memory
    encoder)."""
    quality: float | None = None
    """Seconds of the run spent scoring slices by reverse propagation (the engine only)."""


class StageHooks:
    """Forward pre/post hooks timing SAM2 modules (sync on CUDA so the times are real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(STAGES, 0)
        self.handles: list = []
        self._start: dict[int, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def attach(self, module: torch.nn.Module, stage: str) -> None:
        def pre(mod, args, kwargs=None):
            self._sync()
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, output, kwargs=None):
            self._sync()
            self.times[stage] += time.perf_counter() - self._start.pop(id(mod))
            self.calls[stage] += 1

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def attach_sam(self, sam: torch.nn.Module) -> None:
        self.attach(sam.image_encoder, "encode")
        self.attach(sam.memory_attention, "memory_attention")
        self.attach(sam.sam_mask_decoder, "decode")
        self.attach(sam.memory_encoder, "memory_encode")

    @contextmanager
    def timed(self, stage: str):
        self._sync()
        t = time.perf_counter()
        yield
        self._sync()
        self.times[stage] += time.perf_counter() - t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def synthetic_ct(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU) with an ellipsoidal structure through most slices."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(40.0, 25.0, (n, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.4) ** 2 > 1
    vol[:, body] = -1000.0
    lab = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        z = (k - n / 2) / (n * 0.45)
        r = max(0.0, 1 - z * z)
        if r <= 0:
            continue
        organ = ((yy - 0.45 - 0.05 * z) / (0.15 * r)) ** 2 + ((xx - 0.55) / (0.12 * r)) ** 2 < 1
        vol[k][organ] += 80.0
        lab[k][organ] = 1
    return vol, lab


def clinical_support_slices(lab: np.ndarray) -> list[int]:
    """Near both ends of the structure and in its middle: what a clinician draws."""
    present = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))
    lo, hi = int(present[0]), int(present[-1])
    return sorted({lo + 1, (lo + hi) // 2, hi - 1})


def run_video_predictor(seg, load_frames, masks: dict[int, torch.Tensor],
                        compile_encoder: bool) -> Measurement:
    """``load_frames()`` builds the model-ready frames inside the measured region, as SAM2's
    ``init_state`` loads and normalises every frame itself."""
    cfg = seg.model.config
    grid = cfg.image_size // 16
    predictor = build_sam2_video_predictor(
        resolve_model_name(cfg.size).config, ckpt_path=None, device=str(seg.device),
        hydra_overrides_extra=[
            f"++model.image_size={cfg.image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
        ] + list(cfg.sam2_overrides),
    )
    predictor.load_state_dict(seg.model.sam.state_dict())
    if compile_encoder:
        predictor.image_encoder.forward = torch.compile(predictor.image_encoder.forward)
    hooks = StageHooks(seg.device)
    hooks.attach_sam(predictor)
    original_loader = vp.load_video_frames
    original_resize = predictor._get_orig_video_res_output

    def resize_timed(*a, **k):
        with hooks.timed("write_back"):
            return original_resize(*a, **k)

    predictor._get_orig_video_res_output = resize_timed
    def loader(**kw):
        images = load_frames().to(kw["compute_device"])
        return images, images.shape[-2], images.shape[-1]

    vp.load_video_frames = loader
    m = Measurement("(a) SAM2 video predictor")
    try:
        _reset_device_peak(seg.device)
        # The same autocast as the engine runs under, so both sides compute alike.
        autocast = torch.autocast(seg.device.type, dtype=seg.autocast_dtype or torch.float32,
                                  enabled=seg.autocast_dtype is not None)
        with PeakRSS() as rss, autocast:
            t = time.perf_counter()
            state = predictor.init_state(video_path="(in memory)")
            for k in sorted(masks):
                predictor.add_new_mask(state, frame_idx=k, obj_id=1, mask=masks[k][0, 0] > 0.5)
            for _ in predictor.propagate_in_video(state, start_frame_idx=min(masks)):
                pass
            for _ in predictor.propagate_in_video(state, start_frame_idx=max(masks), reverse=True):
                pass
            _sync(seg.device)
            m.wall = time.perf_counter() - t
        m.peak_host = rss.above_base
        m.peak_device = _device_peak(seg.device)
    finally:
        vp.load_video_frames = original_loader
        hooks.remove()
    m.stages = dict(hooks.times)
    m.encodes = hooks.calls["encode"]
    m.calls = dict(hooks.calls)
    return m


PROPAGATION_ONLY = {"use_pma": False, "reverse_quality": False, "interpolation_prior": "off"}
"""(c) with --floor: the engine doing SAM2's propagation alone (PMG on its bank; no PMA, no
quality score, no interpolation), strictly less work than (b): how low (b)/(a) could go if the
method's own additions cost nothing."""


def run_engine(seg, vol: np.ndarray, lab: np.ndarray, support: list[int],
               name: str = "(b) SlicerSGP engine", **options) -> Measurement:
    drawn = np.zeros_like(lab)
    drawn[support] = lab[support]
    hooks = StageHooks(seg.device)
    hooks.attach_sam(seg.model.sam)
    seg.sync_timers = True  # the write-back figure below comes from the engine's own timer
    seg.clear_cache()
    before = seg.encode_count
    m = Measurement(name)
    try:
        _reset_device_peak(seg.device)
        with PeakRSS() as rss:
            t = time.perf_counter()
            result = seg.segment(vol, drawn, {1: "structure"},
                                 SegmentOptions(intensity="percentile", keep_pseudo_masks=False,
                                                **options))
            _sync(seg.device)
            m.wall = time.perf_counter() - t
        m.peak_host = rss.above_base
        m.peak_device = _device_peak(seg.device)
    finally:
        hooks.remove()
    m.stages = dict(hooks.times)
    m.stages["write_back"] = result.timings.get("stage:write_back", 0.0) + \
        result.timings.get("assemble", 0.0)
    m.encodes = seg.encode_count - before
    m.calls = dict(hooks.calls)
    m.quality = result.timings.get("stage:quality", 0.0)
    return m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _device_peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def report(ms: list[Measurement], n: int, device: torch.device, note: str) -> str:
    lines = [note, ""]
    head = f"{'':28}{'wall s':>9}{'slices/s':>10}{'s/slice':>9}{'encodes':>9}" \
           f"{'host MiB':>10}{'dev MiB':>10}  " + "  ".join(f"{s:>16}" for s in STAGES)
    lines.append(head)
    for m in ms:
        lines.append(
            f"{m.name:28}{m.wall:9.2f}{n / m.wall:10.2f}{m.wall / n:9.3f}{m.encodes:9d}"
            f"{_mib(m.peak_host):>10}{_mib(m.peak_device):>10}  "
            + "  ".join(f"{m.stages.get(s, 0.0):16.2f}" for s in STAGES)
        )
    a, b = ms[:2]
    lines.append("")
    for m in ms:
        lines.append(f"{m.name}: calls " + ", ".join(
            f"{s} {m.calls[s]}" for s in STAGES if m.calls.get(s)))
    if b.quality:
        lines.append(f"{b.name}: reverse-propagation quality score {b.quality:.2f} s, "
                     f"{100 * b.quality / max(b.wall, 1e-9):.1f}% of its wall time")
    lines.append(f"ratio (b)/(a): wall {b.wall / a.wall:.3f}, peak host memory "
                 f"{b.peak_host / max(a.peak_host, 1):.3f}"
                 + (f", peak device memory {b.peak_device / max(a.peak_device, 1):.3f}"
                    if device.type == "cuda" else ""))
    for c in ms[2:]:
        lines.append(f"ratio {c.name[:3]}/(a): wall {c.wall / a.wall:.3f} (the floor: SAM2's "
                     "propagation through the engine, without PMA and the quality score)")
    return "\n".join(lines)


def encoder_flops_per_slice(seg) -> float:
    """Multiply-adds x2 of one image-encoder pass, counted by torch's FLOP counter."""
    x = torch.zeros(1, 3, seg.image_size, seg.image_size, device=seg.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        seg.model.sam.forward_image(x)
    return float(counter.get_total_flops())


def prepare(seg, compile_encoder: bool = False) -> None:
    """Random weights score "no object" on most slices; a real model would not. Lift the object
    score head so both sides produce masks and do their full work; optionally compile."""
    with torch.no_grad():
        head = seg.model.sam.sam_mask_decoder.pred_obj_score_head
        (head.layers[-1] if hasattr(head, "layers") else head).bias.fill_(8.0)
    if compile_encoder:
        seg.model.sam.image_encoder.forward = torch.compile(seg.model.sam.image_encoder.forward)


def warm_up(seg, vol: np.ndarray, lab: np.ndarray) -> None:
    """First-call allocations (and compilation), not measured: three slices from the middle of
    the volume (the structure is there), then every cache emptied."""
    mid = slice(vol.shape[0] // 2 - 1, vol.shape[0] // 2 + 2)
    seg.segment(vol[mid], lab[mid], {1: "s"}, None, support_slices=[1])
    seg.clear_cache()


def run_bench(seg, *, slices: int, size: int, compile_encoder: bool = False,
              skip_sam2: bool = False, repeat: int = 1,
              floor: bool = False) -> tuple[list[Measurement], int, list[int]]:
    """(a) and (b) on a synthetic CT of ``slices`` x ``size`` x ``size``, alternated ``repeat``
    times, each side's fastest run kept. Returns the measurements, the slice count and the
    support slices."""
    vol, lab = synthetic_ct(slices, size)
    support = clinical_support_slices(lab)
    tf = preprocess.LetterboxTransform(size, size, seg.image_size)

    warm_up(seg, vol, lab)

    masks = {k: tf.mask_to_model(torch.from_numpy(lab[k][None, None].astype(np.float32)))
             for k in support}

    def load_frames() -> torch.Tensor:
        vol01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "percentile"))
        return preprocess.to_model_input(vol01, tf)

    best: dict[str, Measurement] = {}
    for _ in range(max(1, repeat)):
        runs = [] if skip_sam2 else [run_video_predictor(seg, load_frames, masks,
                                                          compile_encoder)]
        runs.append(run_engine(seg, vol, lab, support))
        if floor:
            runs.append(run_engine(seg, vol, lab, support, "(c) propagation only",
                                   **PROPAGATION_ONLY))
        for m in runs:
            if m.name not in best or m.wall < best[m.name].wall:
                best[m.name] = m
    return list(best.values()), vol.shape[0], support


def run_note(seg, model: str, size: int, n: int, support: list[int], compiled: bool) -> str:
    """One line naming what was measured where."""
    dev = str(seg.device)
    if seg.device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(seg.device)})"
    return (f"volume {size}x{size}x{n}, support slices {support}, SAM2.1 {model} "
            f"@ {seg.image_size}px, device {dev}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, autocast {seg.autocast_dtype}, "
            f"feature cache {seg.feature_dtype}, compile {compiled}")


def single_report(m: Measurement, n: int, note: str) -> str:
    """The report when only (b) ran."""
    return (f"{note}\n{m.name}: {m.wall:.3f} s, {n / m.wall:.1f} slices/s, peak host "
            f"{_mib(m.peak_host)} MiB, device {_mib(m.peak_device)} MiB, stages "
            + ", ".join(f"{k} {v:.3f}" for k, v in m.stages.items()))


def flops_report(seg, engine: Measurement, n: int, peak_tflops: float) -> str:
    """Encoder FLOPs per slice and the fraction of the device's peak reached."""
    flops = encoder_flops_per_slice(seg)
    achieved = flops * engine.encodes / max(engine.stages["encode"], 1e-9) / 1e12
    whole = flops * n / engine.wall / 1e12
    return (f"encoder: {flops / 1e9:.1f} GFLOP/slice; {achieved:.1f} TFLOP/s in the encode "
            f"stage = {achieved / peak_tflops:.1%} of {peak_tflops} TFLOP/s; "
            f"whole run: {whole:.1f} TFLOP/s = {whole / peak_tflops:.1%}")
