"""Segment a volume from a support set: SAM2-SGP with bidirectional slice propagation.

:class:`Segmenter` is the one public entry point, a thin facade over the parts that each hold
one responsibility:

1. :mod:`~SlicerSGP.method.encoding`: every slice (and every external support image) is encoded
   once; features of recent volumes are cached for the other direction, the other structures
   and later runs on the same volume;
2. :mod:`~SlicerSGP.method.prompts`: a prompted slice's mask (box, clicks) becomes a drawn slice;
3. :mod:`~SlicerSGP.method.support`: each support item becomes a memory through SAM2's memory
   encoder, its mask given as SAM2 encodes a mask prompt on a conditioning frame; the K most
   similar are picked per slice;
4. :mod:`~SlicerSGP.method.propagation` (with :mod:`~SlicerSGP.method.slice_predictor` and
   :mod:`~SlicerSGP.method.memory`): sweeps restart at every labeled slice and run to the next
   one (or the structure's end); per slice, PMG pseudo-mask, PMA final mask, new memory;
5. :mod:`~SlicerSGP.method.rerun`: a re-run reuses, exactly, every slice result of the last run
   whose inputs are unchanged (a new drawn slice redoes the intervals beside it and the slices
   whose support now picks it); :mod:`~SlicerSGP.method.assembly`: slices reached from both
   sides are fused with weights that fall with distance; labeled slices come back as drawn.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
import torch

from SlicerSGP.build_model import build_model, load_sgp_checkpoint
from SlicerSGP.data import preprocess
from SlicerSGP.data.prompt_checks import check_prompts
from SlicerSGP.method.assembly import (
    assemble,
    clear_excluded,
    count_predictions,
    label_map_from_probabilities,
    restore_order,
)
from SlicerSGP.method.encoding import EncodedSlices, SliceEncoder, VolumeFeatures
from SlicerSGP.method.feature_cache import FeatureCache, prepare_folder
from SlicerSGP.method.inputs import (
    check_clicks,
    check_labels,
    check_support,
    labeled_by_structure,
    resolve_structures,
    slice_limits,
    validate_options,
)
from SlicerSGP.method.model import SGPModel
from SlicerSGP.method.multiview import fuse_views
from SlicerSGP.method.prior import PriorCache
from SlicerSGP.method.prompts import apply_prompts, exclusion_lookup, window_voxels
from SlicerSGP.method.propagation import Accumulator, Propagator
from SlicerSGP.method.rerun import RerunCache, StructureRun, drawn_memories
from SlicerSGP.method.runtime import Runtime, resolve_device
from SlicerSGP.method.slice_predictor import SlicePredictor, StepOutput
from SlicerSGP.method.support import Memory, SupportMemories
from SlicerSGP.types import (
    CancelCheck,
    Geometry,
    ProgressCallback,
    SegmentationResult,
    SegmentOptions,
    SlicePrompt,
    SupportItem,
)

# A run's slices in [0, 1], their letterbox and their (lazily encoded) features.
Features = tuple[np.ndarray, preprocess.LetterboxTransform, VolumeFeatures]


class Segmenter:
    """A loaded SAM2-SGP model and the embeddings of the volumes it saw last.

    Keep one for the session: a re-run on the same volume (after correcting a slice, or for
    another structure) reuses the slice embeddings, and its last run's unaffected slices.
    Long because it is the one public entry point: what callers read, the building blocks
    training and the oracle tests drive, and the two entry points, each delegating.
    """

    def __init__(self, model: str | SGPModel = "tiny", *, weights: str | None = None,
                 device: str | torch.device = "auto", image_size: int | None = None,
                 seed: int = 0, dtype: str = "auto", feature_dtype: str = "auto",
                 cache_mb: float | None = None, features_on: str = "auto",
                 device_budget_mb: float | None = None,
                 feature_cache: str | os.PathLike | None = None,
                 feature_cache_mb: float | None = None):
        dev = resolve_device(device)
        if feature_cache is not None:  # a bad folder or cap fails before the model loads
            prepare_folder(feature_cache, feature_cache_mb)
        if isinstance(model, SGPModel):
            net = model
        elif str(model).endswith(".safetensors"):
            # weights None: the base SAM2 weights the checkpoint names in its metadata.
            net = load_sgp_checkpoint(model, image_size=image_size, weights=weights)
        else:
            net = build_model(str(model), weights=weights, image_size=image_size or 1024, seed=seed)
        self._identity = {"model": model if isinstance(model, str) else net.config.size,
                          "weights": weights, "seed": seed, "dtype": dtype,
                          "feature_dtype": feature_dtype}
        self.runtime = Runtime(net.to(dev).eval(), dev, dtype, feature_dtype)
        self.encoder = SliceEncoder(self.runtime, cache_mb, features_on, device_budget_mb)
        if feature_cache is not None:
            # Encoded slices also go to disk, for a later Segmenter or process on the same
            # volume and model (see SlicerSGP.method.feature_cache).
            self.encoder.disk = FeatureCache(feature_cache, self.runtime, feature_cache_mb)
        self.support = SupportMemories(self.runtime, self.encoder)
        self.predictor = SlicePredictor(self.runtime)
        self.propagator = Propagator(self.runtime, self.predictor, self.support.memory)
        self.reruns = RerunCache(lambda: self.encoder.cache_bytes - self.encoder.cached_bytes())
        """Last runs' slice results per volume and structure, in what features leave of cache_mb."""
        self._windows: dict[str, tuple[float, float]] = {}  # last intensity window per volume
        self.priors = PriorCache()  # interpolation priors per structure and drawing
        self.priors.worker.start()  # ITK loads in its own process while the model works

    # ------------------------------------------------------------------ what callers read

    @property
    def model(self) -> SGPModel:
        return self.runtime.model

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def image_size(self) -> int:
        return self.runtime.image_size

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.runtime.autocast_dtype

    @property
    def feature_dtype(self) -> torch.dtype | None:
        return self.runtime.feature_dtype

    @property
    def stage_times(self) -> dict[str, float]:
        return self.runtime.stage_times

    @property
    def sync_timers(self) -> bool:
        return self.runtime.sync_timers

    @sync_timers.setter
    def sync_timers(self, value: bool) -> None:
        self.runtime.sync_timers = bool(value)

    @property
    def encode_count(self) -> int:
        return self.encoder.encode_count

    @property
    def feature_cache(self) -> FeatureCache | None:
        """Slice features on disk (``feature_cache=DIR``), or None."""
        return self.encoder.disk

    @property
    def disk_loaded_slices(self) -> int:
        """Slices whose features were loaded from the feature cache instead of encoded."""
        return self.encoder.disk.loaded_slices if self.encoder.disk is not None else 0

    def describe(self) -> dict[str, Any]:
        """What is loaded, for a service's info endpoint and model-mismatch checks."""
        return {**self._identity, "image_size": self.image_size, "device": str(self.device),
                "mode": self.model.config.mode,
                "autocast": str(self.autocast_dtype or torch.float32).replace("torch.", "")}

    def clear_cache(self) -> None:
        """Forget cached slice features, support memories and last runs' slice results (e.g.
        after changing weights; features on disk are then looked up under the new weights'
        fingerprint)."""
        self.encoder.clear()
        self.support.clear()
        self.reruns.clear()
        self.priors.clear()
        if self.encoder.disk is not None:
            self.encoder.disk.refresh()

    # ------------------------------------------------------------------ the building blocks
    # (training and the oracle tests drive these directly)

    def encode_images(self, images: Any, batch_size: int = 4, progress: Any = None,
                      cancel: CancelCheck | None = None, grad: bool = False,
                      count: int | None = None) -> EncodedSlices:
        return self.encoder.encode_images(images, batch_size, progress, cancel, grad, count)

    def support_memory(self, feats: EncodedSlices, i: int, mask_model: torch.Tensor,
                       slice_index: int | None, grad: bool = False) -> Memory:
        return self.support.memory(feats, i, mask_model, slice_index, grad)

    def step(self, feats: EncodedSlices, j: int, image: torch.Tensor | None,
             support: list[Memory], bank: list[Memory], ptr_history: dict[int, torch.Tensor],
             reverse: bool, num_frames: int, opts: SegmentOptions,
             encode_memory: bool = True) -> StepOutput:
        return self.predictor.step(feats, j, image, support, bank, ptr_history, reverse,
                                   num_frames, opts, encode_memory)

    def run_sweep(self, feats: EncodedSlices, order: list[int], reverse: bool,
                  labeled: Any, support_pool: list[Memory], opts: SegmentOptions,
                  image_of: Any = None, stop: CancelCheck | None = None,
                  seed: tuple[int, StepOutput] | None = None, grad: bool = False):
        return self.propagator.run_sweep(feats, order, reverse, labeled, support_pool, opts,
                                         image_of, stop, seed, grad)

    # ------------------------------------------------------------------ public entry points

    def segment(
        self,
        volume: np.ndarray,
        labels: np.ndarray | None = None,
        structures: dict[int, str] | None = None,
        options: SegmentOptions | None = None,
        *,
        support_slices: list[int] | None = None,
        support_bank: dict[int, list[SupportItem]] | None = None,
        prompts: list[SlicePrompt] | None = None,
        geometry: Geometry | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> SegmentationResult:
        """Segment ``structures`` through ``volume`` (the method: module docstring); each of
        ``prompts`` first makes its slice's mask, a drawn slice from then on (method.prompts)."""
        opts = options or SegmentOptions()
        validate_options(opts, self.model)
        report = progress or (lambda stage, frac: None)
        stop = cancel or (lambda: False)
        t0 = time.perf_counter()
        self.runtime.stage_times = {}
        encoded_before = self.encode_count
        loaded_before = self.disk_loaded_slices
        self.encoder.peak_device_bytes = self.encoder.device_bytes()

        preprocess.validate_volume(volume, axis=opts.axis, min_size=16)
        if labels is not None:
            labels = check_labels(labels, volume.shape[:3])
        vol = preprocess.reorient(volume, opts.axis)
        lab = preprocess.reorient(labels, opts.axis) if labels is not None else None
        n, h, w = vol.shape[:3]
        prompts = check_prompts(prompts, (n, h, w), opts.axis, opts.exclude)
        structures = resolve_structures(structures, labels, support_bank,
                                        {p.value for p in prompts}, opts.exclude)
        labeled = labeled_by_structure(lab, structures, support_slices, opts.complete_slices,
                                       n, opts.axis)
        timings: dict[str, float] = {}
        features, prompted, notes = None, {}, []
        if prompts:  # each prompted slice becomes a drawn one (lab is then a copy)
            features = self._features(vol, lab, structures, opts, window_voxels(vol, prompts))
            lab, prompted, notes = apply_prompts(self.predictor, features, lab, prompts, opts,
                                                 labeled, stop, timings)
        check_support(labeled, structures, bank := support_bank or {})
        per_structure: dict[int, Accumulator | None] = {}
        todo = {v: name for v, name in structures.items() if len(labeled[v]) < n}
        if not todo:
            notes.append(f"Every one of the {n} slices is labeled: the labels are returned "
                         "as drawn, nothing was predicted.")
        else:
            per_structure = self._propagate_all(vol, lab, labeled, todo, bank, opts, report,
                                                stop, timings, features)
        per_structure = {v: per_structure.get(v) for v in structures}

        tw = time.perf_counter()
        report("write", 0.0)
        result = assemble(per_structure, structures, lab, labeled, opts, (n, h, w), prompted)
        restore_order(result, opts.axis)
        report("write", 1.0)
        timings["assemble"] = time.perf_counter() - tw
        timings["total"] = time.perf_counter() - t0
        timings.update({f"stage:{k}": v for k, v in self.stage_times.items()})
        result.geometry, result.timings, result.notes = geometry, timings, notes
        result.stats = {"slices": n, "slices_encoded": self.encode_count,
                        "slices_encoded_this_run": self.encode_count - encoded_before,
                        "slices_loaded_from_disk": self.disk_loaded_slices - loaded_before,
                        "feature_device_peak_bytes": self.encoder.peak_device_bytes,
                        "support_slices": len(result.labeled_slices)}
        count_predictions(result, per_structure)
        if opts.multi_view and per_structure and any(per_structure.values()):
            tm = time.perf_counter()
            drawn = labels if not prompts else preprocess.restore_orientation(lab, opts.axis)
            result = fuse_views(self, volume, drawn, result, opts)
            timings["multi_view"] = time.perf_counter() - tm
        clear_excluded(result, labels, opts.exclude)
        return result

    def _propagate_all(self, vol: np.ndarray, lab: np.ndarray | None,
                       labeled: dict[int, list[int]], structures: dict[int, str],
                       bank: dict[int, list[SupportItem]], opts: SegmentOptions,
                       report: ProgressCallback, stop: CancelCheck,
                       timings: dict[str, float],
                       features: Features | None = None) -> dict[int, Accumulator]:
        """Both sweeps per structure on the volume's features (each slice encoded once, when
        a sweep first reaches it; the drawn ones first); ``features``: the prompts' ones."""
        slices01, transform, feats = features or self._features(vol, lab, structures, opts)
        feats.stop = stop
        try:
            with self.runtime.autocast():  # one region: each weight is cast to bf16 once
                report("encode", 0.0)
                feats.ensure(sorted({k for v in structures for k in labeled[v]}),
                             lambda f: report("encode", f), stop)
                report("encode", 1.0)
                per_structure = self._propagate_structures(
                    feats, slices01, transform, lab, labeled, structures, bank, opts, report,
                    stop, timings)
        finally:
            feats.stop = None
        timings["encode"] = self.stage_times.get("encode", 0.0)
        return per_structure

    def _features(self, vol: np.ndarray, lab: np.ndarray | None, structures: dict[int, str],
                  opts: SegmentOptions, prompted: np.ndarray | None = None) -> Features:
        """The run's intensity window (chosen on the drawn voxels and those ``prompted``),
        slices in [0, 1] and features (encoded when first read)."""
        n, h, w = vol.shape[:3]
        drawn = vol[np.isin(lab, list(structures))] if lab is not None else None
        if prompted is not None:
            drawn = prompted if drawn is None else np.concatenate([drawn.ravel(), prompted])
        lo, hi = preprocess.intensity_range(vol, opts.intensity, drawn=drawn)
        self._windows[_fingerprint(vol, opts.intensity)] = (lo, hi)
        slices01 = preprocess.normalize_intensity(vol, lo, hi)
        transform = preprocess.LetterboxTransform(h, w, self.image_size)
        return slices01, transform, self.encoder.volume(slices01, transform,
                                                        self._batch_size(opts))

    def _propagate_structures(self, feats: VolumeFeatures, slices01: np.ndarray,
                              transform: preprocess.LetterboxTransform, lab: np.ndarray | None,
                              labeled: dict[int, list[int]], structures: dict[int, str],
                              bank: dict[int, list[SupportItem]], opts: SegmentOptions,
                              report: ProgressCallback, stop: CancelCheck,
                              timings: dict[str, float]) -> dict[int, Accumulator]:
        n, h, w = slices01.shape[:3]
        per_structure: dict[int, Accumulator] = {}
        runs: dict[int, StructureRun | None] = {}
        tp = time.perf_counter()
        encoding_before = self.stage_times.get("encode", 0.0)
        exclude_of = exclusion_lookup(lab, opts.exclude, transform, self.device)
        for si, (value, name) in enumerate(structures.items()):
            masks = {k: (lab[k] == value) if lab is not None else np.zeros((h, w), bool)
                     for k in labeled[value]}
            prior, tokens = self.priors.for_run(masks, n, opts.interpolation_prior, timings)
            # Exclusion depends on voxels the re-run's record does not hold: no reuse with it.
            run = self.reruns.start(feats, value, opts, tokens) \
                if opts.reuse_results and exclude_of is None else None
            own = drawn_memories(self.support, feats, transform, masks, run, exclude_of)
            ext = self.support.external(bank.get(value, []), stop)

            def stage_progress(frac: float, _si: int = si, _name: str = name) -> None:
                report(f"propagate {_name}", (_si + frac) / len(structures))

            per_structure[value] = self.propagator.propagate(
                feats, slices01, transform, masks, own + ext, opts, stage_progress, stop,
                slice_limits(opts, value), run, exclude_of=exclude_of, prior=prior)
            runs[value] = run
        # Only a run that completed becomes the one the next run compares with.
        for value, run in runs.items():
            self.reruns.commit(feats, value, opts, run)
        # Encoding and interpolation done on the way are counted in their own timings.
        encoding = self.stage_times.get("encode", 0.0) - encoding_before
        timings["propagate"] = time.perf_counter() - tp - encoding - timings.get("interpolation", 0)
        return per_structure

    def refine_slice(self, volume: np.ndarray, slice_index: int,
                     points: list[tuple[float, float]], point_labels: list[int],
                     mask: np.ndarray | None, options: SegmentOptions | None = None,
                     ) -> tuple[np.ndarray, float]:
        """Correct one slice with clicks: SAM2 point prompts (1 = include, 0 = exclude) at
        (row, col) pixels of slice ``slice_index`` along ``options.axis``, with the slice's
        current mask as the dense prompt. Returns the new mask and SAM2's predicted IoU."""
        opts = options or SegmentOptions()
        validate_options(opts, self.model)
        preprocess.validate_volume(volume, axis=opts.axis, min_size=16)
        vol = preprocess.reorient(volume, opts.axis)
        n, h, w = vol.shape[:3]
        check_clicks(slice_index, points, point_labels, mask, (n, h, w))
        # The window of the last run on this volume, so clicks refine the features it used.
        window = self._windows.get(_fingerprint(vol, opts.intensity)) or \
            preprocess.intensity_range(vol, opts.intensity)
        slices01 = preprocess.normalize_intensity(vol, *window)
        transform = preprocess.LetterboxTransform(h, w, self.image_size)
        feats = self.encoder.volume(slices01, transform, self._batch_size(opts))
        return self.predictor.refine(feats, int(slice_index), transform, list(points),
                                     [int(v) for v in point_labels],
                                     None if mask is None else np.asarray(mask, bool))

    def _batch_size(self, opts: SegmentOptions) -> int:
        return int(opts.encode_batch_size or (8 if self.device.type == "cuda" else 1))


def _fingerprint(vol: np.ndarray, mode: str) -> str:
    """A cheap identity of a volume: shape, type and a strided sample of its voxels."""
    sample = np.ascontiguousarray(vol[::5, ::7, ::7])
    return f"{mode}|{vol.shape}|{vol.dtype}|" + hashlib.sha1(sample.view(np.uint8)).hexdigest()


__all__ = ["EncodedSlices", "Memory", "Segmenter", "label_map_from_probabilities",
           "resolve_device"]
