"""A new store's calibration: one teacher pass over the calibration rows fits what the stored fields need and keeps
those rows' fields, so that ``cache-teacher`` runs every row through the teacher once.

    calibration = calibrate_rows(model, rows, layout, hidden_dim, batch_size, device)
    calibration.arrays    # store-level arrays: standardize/, pca/, stats/hidden/<l>, targets/id_by_rank
    calibration.report    # the manifest's calibration figures (positions, hidden clip share per layer)
    calibration.fidelity  # the manifest's fidelity of the compact targets (None for topk-fp16)
    calibration.finish_batch_of(row_id)  # that row's batch's stored fields (as compute_batch_fields gives them)

[calibration note] The stored fields of a row depend on what the calibration fits: its hidden states are
standardized (and PCA-reduced) with the calibration's statistics ([hidden-range note] in fields.py), its compact
targets' ids are ranks of the calibration's unigram table ([target-codec note] in cache/targets.py). Everything
else of a row is the teacher's output alone. So the pass runs ``run_teacher`` on the calibration rows once, in
batches: the logit fields and attention as stored, the targets chosen but not yet encoded, the hidden states raw;
each T=1 slice of logits also feeds the rank table and the fidelity (``TargetCalibration``), the text positions'
hidden states the statistics. Once all are seen, the fitted arrays give the store's ``field_settings``, and each
kept batch is finished with them (``finish_fields``) when the fill loop takes its rows (so that the writer writes
one chunk while the next is finished): the same arithmetic, on the same device, as the fill loop applies to a row
it runs itself, so the kept rows are stored as they are. A row's draws do not depend on its batch
(``compute_logit_fields``), but under several intra-op threads its values may in the last bit: a calibration row
that must be computed again (a resume, another process's shard) is computed with its calibration batch
(``CalibratedRows`` in cache_teacher.py), so a resumed store is the uninterrupted one byte for byte.
Memory: the calibration rows' outputs are held on the CPU until the fit, the raw hidden states in the teacher's
dtype (rows x seq_len x hidden x stored layers: 64 x 512 x 640 x 4 x 4 B = 335 MB for Gemma 3 270M in fp32, as
much as the statistics' samples took before), until the fill loop takes and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.cache.schema import PCA_GROUP, STANDARDIZE_GROUP, STATS_GROUP, root_array_path
from distill.pipeline.losses.hidden_targets import TARGET_CLIP, TARGET_EPS
from distill.pipeline.teacher.fields import (
    FP16_MAX,
    FieldSettings,
    field_settings,
    finish_fields,
    run_teacher,
    text_positions,
)
from distill.pipeline.teacher.target_fields import TargetCalibration
from distill.pipeline.text.data import Row


@dataclass
class Calibration:
    """What a new store's calibration pass gives (see the module docstring)."""

    arrays: dict[str, np.ndarray]
    report: dict[str, Any]
    fidelity: dict[str, Any] | None
    pending: list[tuple[list[Row], dict[str, torch.Tensor], torch.Tensor]]
    """Each calibration batch not yet finished: its rows, ``run_teacher``'s outputs (on the CPU), valid (B, W)."""
    settings: FieldSettings  # the store's, fitted
    device: torch.device

    def finish_batch_of(self, row_id: int) -> tuple[dict[int, dict[str, np.ndarray]], list[int]] | None:
        """The stored fields of each row of the pending batch holding ``row_id`` (row id -> one-row arrays) and the
        ids of its rows whose output is not finite (not blanked), the batch's raw outputs freed; None if no pending
        batch holds the row."""
        for k, (batch, computed, valid) in enumerate(self.pending):
            if any(int(row.row_id) == row_id for row in batch):
                del self.pending[k]
                on_device = {name: value.to(self.device) for name, value in computed.items()}
                stored, bad = finish_fields(on_device, batch, valid.to(self.device), self.settings)
                fields = {int(row.row_id): {n: v[i : i + 1] for n, v in stored.items()} for i, row in enumerate(batch)}
                return fields, [int(batch[i].row_id) for i in bad]
        return None

    def keep_only(self, rows: set[int]) -> None:
        """Drop the pending batches that hold none of ``rows`` (another process's shards)."""
        self.pending = [item for item in self.pending if any(int(row.row_id) in rows for row in item[0])]


def calibrate_rows(
    model: Any,
    rows: list[Row],
    layout: dict[str, Any],
    hidden_dim: int | None,
    batch_size: int,
    device: torch.device,
) -> Calibration:
    """One teacher pass over ``rows``: fit the store-level arrays, measure, and keep each row's stored fields."""
    unfitted = field_settings(layout, None, device)
    targets = None
    if unfitted.targets is not None:
        vocab, positions = model.get_output_embeddings().weight.shape[0], sum(len(row.input_ids) for row in rows)
        targets = TargetCalibration(layout, vocab, device, positions)
    kept = []  # (rows, run_teacher's output on the CPU, valid (B, W), text positions (B, W))
    tokens = sum(len(row.input_ids) for row in rows)
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="cache-teacher: calibration", dynamic_ncols=True)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        computed, valid = run_teacher(model, batch, unfitted, device, observe=targets.observe if targets else None)
        computed = {name: value.cpu() for name, value in computed.items()}
        kept.append((batch, computed, valid.cpu(), text_positions(batch, valid.shape[1])))
        bar.update(sum(len(row.input_ids) for row in batch))
    bar.close()
    arrays: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {"positions": {}, "hidden_clip": TARGET_CLIP, "hidden_clip_share": {}}
    for layer in unfitted.hidden_layers:
        x = torch.cat([computed[f"hidden/{layer}"][text].float() for _, computed, _, text in kept])  # (N, H)
        positions, clip_share = fit_hidden_layer(x, layer, hidden_dim, arrays)
        report["positions"][str(layer)], report["hidden_clip_share"][str(layer)] = positions, clip_share
    fidelity = None
    if targets is not None:
        rank_arrays, fidelity = targets.finish(len(rows))
        arrays.update(rank_arrays)
    settings = field_settings(layout, arrays, device)  # as the fill loop loads them from the store
    pending = [(batch, computed, valid) for batch, computed, valid, _ in kept]
    return Calibration(arrays, report, fidelity, pending, settings, device)


def fit_hidden_layer(
    x: torch.Tensor, layer: int, hidden_dim: int | None, arrays: dict[str, np.ndarray], max_positions: int = 65536
) -> tuple[int, float]:
    """Fit one hidden layer's standardization and PCA basis (if ``hidden_dim``), see [hidden-range note].

    x (N, H) fp32: the calibration rows' raw hidden states at their text positions (the first ``max_positions``
    are used). Adds the layer's store-level arrays to ``arrays``: standardize/hidden/<l>/mean|std (H,),
    pca/hidden/<l>/mean|components, and stats/hidden/<l>/mean|std: per-dimension statistics of what is stored,
    which stage 2 uses to make its targets. Returns what the manifest records: the positions used and the share
    of stored values that stage 2 clips ([target-clip note] in losses/hidden_targets.py), measured on them.
    """
    x = x[:max_positions]
    mean, std, x = column_statistics(x)
    arrays[root_array_path(STANDARDIZE_GROUP, layer, "mean")] = mean.numpy()
    arrays[root_array_path(STANDARDIZE_GROUP, layer, "std")] = std.numpy()
    x = x.div_(std)
    if hidden_dim is not None and hidden_dim < x.shape[1]:
        center = x.mean(dim=0)
        _, _, vh = torch.linalg.svd(x - center, full_matrices=False)
        components = vh[:hidden_dim].T.contiguous()  # (H, D)
        arrays[root_array_path(PCA_GROUP, layer, "mean")] = center.numpy()
        arrays[root_array_path(PCA_GROUP, layer, "components")] = components.numpy()
        x = (x - center) @ components
    stored = x.clamp(-FP16_MAX, FP16_MAX).half().float()  # statistics of what stage 2 will read
    stored_mean, stored_std, centered = column_statistics(stored)
    arrays[root_array_path(STATS_GROUP, layer, "mean")] = stored_mean.numpy()
    arrays[root_array_path(STATS_GROUP, layer, "std")] = stored_std.numpy()
    # what standardize_hidden clips: |stored - mean| beyond TARGET_CLIP · (std + TARGET_EPS), in its dimension's stds
    clipped = centered.abs_() > TARGET_CLIP * (stored_std + TARGET_EPS)
    return int(stored.shape[0]), float(clipped.float().mean())


def column_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, H) -> (mean (H,), std (H,) unbiased, NaN -> 1, at least 1e-6; x - mean (N, H)): two passes over x
    (torch's std over the first axis of a row-major (N, H) is ~20x slower than a mean)."""
    mean = x.mean(dim=0)
    centered = x - mean
    variance = centered.square().sum(dim=0) / max(x.shape[0] - 1, 0)
    return mean, variance.sqrt().nan_to_num(1.0).clamp_min(1e-6), centered
