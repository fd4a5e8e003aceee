"""The teacher's stored fields: what stage 1 computes for a batch of rows.

    s = field_settings(layout, root, device)                  # from a store's layout (or the live teacher's)
    arrays, bad_rows = compute_batch_fields(model, rows, s, device)   # = finish_fields(*run_teacher(...))

Logit fields (top-K logits and ids, per-temperature logsumexp, target log-prob, vocab_proj) come from
the output head applied in position slices ([logit-pass note]); hidden states are standardized per
dimension and optionally PCA-reduced ([hidden-range note]); attention maps are kept as each query's
top-k keys of the head average. Stage 2's live teacher computes the same fields with these functions; a new
store's calibration (teacher/calibration.py) runs ``run_teacher`` and ``finish_fields`` apart, fitting in between.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.cache.schema import PCA_GROUP, STANDARDIZE_GROUP, field_dtype, root_array_path
from distill.cache.targets import ID_BY_RANK, TARGET_KINDS, kind_of
from distill.pipeline.teacher.logit_pass import POWER_TEMPERATURES, LogitSlice, exp_sums, top_k_rows
from distill.pipeline.teacher.model import compute_logits, find_logit_transforms, forward_teacher
from distill.pipeline.teacher.target_fields import TARGET_FIELDS, choose_target_slice, encode_target_choice
from distill.pipeline.text.data import Row
from distill.pipeline.text.packing import next_in_segment, segment_position_ids

LOGIT_CHUNK = 512  # positions per lm_head slice: bounds the (P, vocab) fp32 logits ([vocab-rows note])
VOCAB_ROWS = {"cpu": 32}  # positions per vocabulary-wide pass, by device type; 128 elsewhere ([vocab-rows note])
CHOICE = "choice/"  # prefix of the targets' choice before encoding (compute_logit_fields, encode_choice)


@dataclass
class FieldSettings:
    """What to compute per row; built from the config and the teacher's shape."""

    seq_len: int
    top_k: int
    temperatures: list[float]
    vocab_proj_temperature: float
    hidden_layers: list[int]
    attention_layers: list[int]
    attention_topk: int
    pca: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean (H,), components (H, D)) of standardized
    vocab_proj: bool = True  # compute vocab_proj (stored only with --vocab-proj)
    targets: dict[str, Any] | None = None  # layout.targets of the compact kinds; None = topk-fp16
    rank_of_id: torch.Tensor | None = None  # (V,) int64 the teacher's unigram rank of each id (compact kinds)
    standardize: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (mean, std) (H,)
    packed: bool = False  # rows may hold several documents: store segment_ids ([packing note] in packing.py)


LOGIT_FIELDS = ("topk_logits", "topk_ids", "lse", "target_logprob", "vocab_proj", *TARGET_FIELDS)


def compute_logit_fields(
    model: Any,
    final_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    s: FieldSettings,
    fields: Collection[str] | None = None,
    seeds: list[int] | None = None,
    observe: Callable[[LogitSlice], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-K logits, per-temperature logsumexp, target log-prob, vocab_proj and the targets' choice, row by row.

    final_hidden (B, L, H) -> topk (B, L, K), lse (B, L, nT), target_logprob (B, L), vocab_proj (B, L, H), and for
    the compact targets their choice before encoding, ``choice/<name>`` (B, L, ...) (``encode_choice`` encodes it);
    only the ``fields`` asked (a subset of LOGIT_FIELDS; default all). Softmax arithmetic in fp32. Row b's first
    ``lengths[b]`` positions are computed (the others stay 0), in slices from the row's start, its draws from a
    generator seeded with ``seeds[b]`` (the row id; default b): a row's draws are the same whichever batch
    computes it. ``observe`` gets each slice at T = 1 (``LogitSlice``: logits, softmax, lse, top-K), for a new
    store's calibration (pipeline/teacher/calibration.py).

    [logit-pass note] Past the lm_head, the vocabulary-wide passes are the cost, so each slice makes as few as it
    can: one top-K in two levels (its first value is the row max; [two-level note] in logit_pass.py), then one
    exponential and two squares that give the sums of exp((z - max) / T) at T = 4, 2 and 1, hence the logsumexps
    exactly (to fp32 rounding: lse_T = max / T + log of the sum) and the T = 1 probabilities after one division
    ([exp-chain note] in logit_pass.py); any other T takes its own softmax (lse_T = max / T - log p_T[argmax]);
    target_logprob reuses T = 1 and vocab_proj the probabilities at T* (its own softmax); the compact targets
    (``target_*``, teacher/target_fields.py) reuse the top-K and T = 1. The (P, V) buffers are allocated once per
    call and written with out= (on CPU a fresh 150 MB tensor costs more in page faults than the softmax over it).
    vocab_proj multiplies in the teacher's dtype when it is bf16, like its lm_head: on a bf16 GPU an fp32 (P, V) @
    (V, H) product is many times slower than the lm_head itself, and its bf16 rounding is the teacher's own.
    """
    want = set(LOGIT_FIELDS if fields is None else fields)
    b, length, h = final_hidden.shape
    lm_head = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight  # (V, H)
    proj_dtype = torch.bfloat16 if embedding.dtype == torch.bfloat16 else torch.float32
    embedding = embedding.to(device=final_hidden.device, dtype=proj_dtype)  # [device-map note]
    flat = final_hidden.reshape(-1, h)
    n, device, vocab = flat.shape[0], flat.device, lm_head.weight.shape[0]
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1).reshape(-1)
    temps = list(s.temperatures) if "lse" in want else []
    if "target_logprob" in want and 1.0 not in temps:
        temps.append(1.0)
    vp_t = s.vocab_proj_temperature
    if "vocab_proj" in want and vp_t not in temps:
        temps.append(vp_t)
    targets = s.targets if want & set(TARGET_FIELDS) else None
    if (targets is not None or observe is not None) and 1.0 not in temps:
        temps.append(1.0)
    # [exp-chain note] in logit_pass.py: T = 2 and 4 with T = 1, unless their own probabilities are needed
    powered = [t for t in temps if t != 1.0 and t in POWER_TEMPERATURES and not ("vocab_proj" in want and t == vp_t)]
    if powered and 1.0 not in temps:
        temps.append(1.0)
    head = targets is not None and TARGET_KINDS[targets["kind"]].head
    k = s.top_k if want & {"topk_logits", "topk_ids"} or head else 1
    choice: dict[str, torch.Tensor] = {}  # name -> (n, ...), allocated at the first slice
    topk_logits = torch.zeros(n, k, device=device)
    topk_ids = torch.zeros(n, k, dtype=torch.long, device=device)
    lse = torch.zeros(n, len(temps), device=device)
    target = torch.zeros(n, device=device)
    proj = torch.zeros(n, h, device=device) if "vocab_proj" in want else None
    row_lengths = lengths.tolist()
    chunk = min(LOGIT_CHUNK, max([1, *row_lengths]))
    sub = min(chunk, VOCAB_ROWS.get(device.type, 128))  # positions per vocabulary pass
    logits_buf = torch.empty(chunk, vocab, device=device)  # (P, V) fp32, reused by every slice
    scaled_buf = torch.empty(sub, vocab, device=device) if any(t not in (1.0, *powered) for t in temps) else None
    probs_buf = torch.empty(sub, vocab, device=device) if temps else None
    transforms = find_logit_transforms(model)
    # [vocab-rows note] The lm_head runs on slices of LOGIT_CHUNK positions (a larger product is a faster one), the
    # vocabulary-wide passes after it (top-K, exponentials, sums) on VOCAB_ROWS positions at a time: on a CPU 32, so
    # that their (P, V) buffers stay in the cache from one pass to the next (at V = 38k the logit fields ran 4-7%
    # faster than with 256 and 256, two runs); on a GPU 128, so that the buffers take what they took with 256 and
    # 256 (512 + 2 x 128 rows of fp32 logits: 0.8 GB at V = 262k). Slices and passes start at each row's start.
    slices = []  # (row, start, stop) of each lm_head slice, with the (start, stop) of its vocabulary passes
    for r, row_length in enumerate(row_lengths):
        for start in range(r * length, r * length + row_length, chunk):
            stop = min(start + chunk, r * length + row_length)
            slices.append((r, start, stop, [(a, min(a + sub, stop)) for a in range(start, stop, sub)]))
    generator = None
    for r, start, stop, parts in slices:
        if start == r * length and targets is not None:  # a row's draws: its own generator, whatever its batch
            generator = torch.Generator(device=device).manual_seed(r if seeds is None else seeds[r])
        whole = compute_logits(model, flat[start:stop], transforms, out=logits_buf[: stop - start])
        for a, e in parts:  # the transforms of [logit-postprocess note] in model.py applied above
            logits, p, rows = whole[a - start : e - start], e - a, slice(a, e)
            top_k_rows(logits, k, out=(topk_logits[rows], topk_ids[rows]))  # descending, [two-level note]
            argmax = topk_ids[rows, :1]
            for j, t in enumerate(temps):
                if t in powered:
                    continue  # with T = 1, below
                scaled = logits if t == 1.0 else torch.mul(logits, 1.0 / t, out=scaled_buf[:p])
                if t == 1.0:  # T = 1 and the powered T's from one exponential and squares, [exp-chain note]
                    row_max = topk_logits[rows, :1]
                    sums = exp_sums(logits, row_max, [1.0, *powered], probs_buf[:p])
                    probs = probs_buf[:p].div_(sums[:, :1])  # the softmax at T = 1
                    lse[rows, j] = row_max[:, 0] + sums[:, 0].log()
                    for i, tp in enumerate(powered):  # each column of that temperature (a list may repeat one)
                        for c in (c for c, t2 in enumerate(temps) if t2 == tp):
                            lse[rows, c] = row_max[:, 0] / tp + sums[:, 1 + i].log()
                else:
                    probs = torch.softmax(scaled, dim=-1, out=probs_buf[:p])
                    lse[rows, j] = scaled.gather(1, argmax)[:, 0] - probs.gather(1, argmax)[:, 0].log()
                if t == 1.0 and "target_logprob" in want:
                    target[rows] = logits.gather(1, next_ids[rows, None])[:, 0] - lse[rows, j]
                if t == s.vocab_proj_temperature and proj is not None:
                    proj[rows] = probs.to(proj_dtype) @ embedding
                if t == 1.0 and targets is not None:
                    top = (topk_logits[rows], topk_ids[rows])
                    part = choose_target_slice(logits, probs, lse[rows, j], *top, targets, generator)
                    for name, value in part.items():
                        if name not in choice:
                            fill = -1 if name == "ids" else 0  # padding positions: no target
                            choice[name] = torch.full((n, *value.shape[1:]), fill, dtype=value.dtype, device=device)
                        choice[name][rows] = value
                if t == 1.0 and observe is not None:
                    observe(LogitSlice(logits, probs, lse[rows, j], topk_logits[rows], topk_ids[rows]))
    out: dict[str, torch.Tensor] = {}
    if "topk_logits" in want:
        out["topk_logits"] = topk_logits.reshape(b, length, k)
    if "topk_ids" in want:
        out["topk_ids"] = topk_ids.reshape(b, length, k)
    if "lse" in want:
        out["lse"] = lse[:, : len(s.temperatures)].reshape(b, length, -1)
    if "target_logprob" in want:
        positions = torch.arange(length, device=input_ids.device)[None, :]
        has_next = positions < (lengths[:, None] - 1)
        out["target_logprob"] = torch.where(has_next, target.reshape(b, length), float("nan"))
    if proj is not None:
        out["vocab_proj"] = proj.reshape(b, length, h)
    for name, value in choice.items():
        out[f"{CHOICE}{name}"] = value.reshape(b, length, *value.shape[1:])
    return out


def encode_choice(computed: dict[str, torch.Tensor], s: FieldSettings) -> None:
    """Replace the targets' ``choice/<name>`` in ``computed`` by the stored ``target_*`` arrays (the store's ranks)."""
    choice = {name[len(CHOICE) :]: computed.pop(name) for name in list(computed) if name.startswith(CHOICE)}
    if choice:
        assert s.targets is not None and s.rank_of_id is not None, "the targets are encoded with the store's ranks"
        computed.update(encode_target_choice(choice, s.targets, s.rank_of_id))


FP16_MAX = 65504.0


def reduce_hidden(hidden: torch.Tensor, layer: int, s: FieldSettings) -> torch.Tensor:
    """(B, L, H) -> (B, L, D) as stored: standardized per dimension, then projected on the PCA basis if one was
    fitted, then bounded to the fp16 range; see [hidden-range note]."""
    hidden = hidden.float()
    if layer in s.standardize:
        mean, std = s.standardize[layer]
        hidden = (hidden - mean) / std
    if layer in s.pca:
        mean, components = s.pca[layer]
        hidden = (hidden - mean) @ components
    return hidden.clamp(-FP16_MAX, FP16_MAX)


def attention_topk(attn: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, L, L) attention (or its head average, heads = 1) -> head-averaged top-k per query row:
    values, key positions (B, L, k)."""
    averaged = attn.float().mean(dim=1)
    # A batch of short rows has fewer keys than k: take them all, the slots past them stay empty.
    values, ids = averaged.topk(min(k, averaged.shape[-1]), dim=-1)
    values, ids = F.pad(values, (0, k - values.shape[-1])), F.pad(ids, (0, k - ids.shape[-1]))
    # A query at position t has only t+1 keys: the slots past them hold weight 0. Give them id 0 so
    # that the stored ids never point at padding and are deterministic (a slot is used iff value > 0).
    ids = torch.where(values > 0, ids, torch.zeros_like(ids))
    return values, ids


def pad_rows(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher ids (B, W) right-padded with 0 to the longest row, and the attention mask (B, W)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    return ids, mask


def pad_segments(rows: list[Row], width: int) -> torch.Tensor | None:
    """(B, width) segment ids of a batch holding a packed row (padding continues each row's last segment);
    None when every row is one document, which then runs with the plain 2D mask."""
    if all(r.segment_ids is None or not r.segment_ids.any() for r in rows):
        return None
    segments = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r.segment_ids is not None and len(r.segment_ids):
            segments[i, : len(r.segment_ids)] = torch.from_numpy(np.asarray(r.segment_ids, dtype=np.int64))
            segments[i, len(r.segment_ids) :] = int(r.segment_ids[-1])
    return segments


def stored_logit_fields(s: FieldSettings) -> list[str]:
    """The logit fields a store with these settings holds (the target fields depend on ``--targets``)."""
    if s.targets is None:
        names = ["topk_logits", "topk_ids", "lse", "target_logprob", "vocab_proj"]
    else:
        names = ["lse", "target_logprob", "vocab_proj", *TARGET_KINDS[s.targets["kind"]].fields]
    return [name for name in names if name != "vocab_proj" or s.vocab_proj]


def compute_batch_fields(
    model: Any, rows: list[Row], s: FieldSettings, device: torch.device, fields: Collection[str] | None = None
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every stored field of ``rows`` as numpy arrays padded to seq_len; plus the rows that were not finite.

    ``fields``: compute only these of the teacher's fields (default all; the row fields input_ids, offsets,
    length, row_id, doc_id and text always come back): the live teacher and the benchmarks skip the rest.
    """
    computed, valid = run_teacher(model, rows, s, device, fields)
    return finish_fields(computed, rows, valid, s)


def run_teacher(
    model: Any,
    rows: list[Row],
    s: FieldSettings,
    device: torch.device,
    fields: Collection[str] | None = None,
    observe: Callable[[LogitSlice], None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One teacher forward of ``rows``: its fields as ``finish_fields`` takes them, and valid (B, W) bool.

    The logit and attention fields are computed (the targets as their choice, ``compute_logit_fields``, which
    passes ``observe`` on), the hidden states of the stored layers come back raw (B, W, H) in the teacher's dtype.
    """
    ids, mask = pad_rows(rows)
    ids, mask = ids.to(device), mask.to(device)
    segments = pad_segments(rows, ids.shape[1])
    segments = None if segments is None else segments.to(device)
    positions = None if segments is None else segment_position_ids(segments)
    lengths = mask.sum(dim=1)
    wanted = None if fields is None else set(fields)
    attention_layers = [layer for layer in s.attention_layers if wanted is None or f"attn/{layer}" in wanted]
    hidden_layers = [layer for layer in s.hidden_layers if wanted is None or f"hidden/{layer}" in wanted]
    logit_fields = [name for name in stored_logit_fields(s) if wanted is None or name in wanted]
    computed: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        out = forward_teacher(model, ids, mask, bool(attention_layers), attention_layers, positions)
        if logit_fields or observe is not None:
            seeds = [int(r.row_id) for r in rows]
            last = out.last_hidden_state
            computed.update(compute_logit_fields(model, last, ids, lengths, s, logit_fields, seeds, observe))
        if segments is not None and "target_logprob" in computed:  # no next token across a document boundary
            computed["target_logprob"].masked_fill_(~next_in_segment(segments, lengths), float("nan"))
        for layer in hidden_layers:
            computed[f"hidden/{layer}"] = out.hidden_states[layer]
        for layer in attention_layers:
            computed[f"attn/{layer}"], computed[f"attn_ids/{layer}"] = attention_topk(
                out.attentions[layer - 1], s.attention_topk
            )
    return computed, mask.bool()


def finish_fields(
    computed: dict[str, torch.Tensor], rows: list[Row], valid: torch.Tensor, s: FieldSettings
) -> tuple[dict[str, np.ndarray], list[int]]:
    """``run_teacher``'s output as stored: hidden states reduced ([hidden-range note]), targets encoded, padded to
    seq_len in the storage dtypes (``pad_fields``); plus the rows whose values are not finite."""
    with torch.inference_mode():
        for name in [name for name in computed if name.startswith("hidden/")]:
            computed[name] = reduce_hidden(computed[name], int(name.split("/")[1]), s)
        encode_choice(computed, s)
        bad = find_nonfinite_rows(computed, valid)
        return pad_fields(computed, rows, valid, s), bad


def find_nonfinite_rows(fields: dict[str, torch.Tensor], valid: torch.Tensor) -> list[int]:
    """Rows with a non-finite value at a valid position in any float field (target_logprob's NaN marks excepted)."""
    bad = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
    for name, value in fields.items():
        if name == "target_logprob" or not value.is_floating_point():
            continue
        stored = value.half() if field_dtype(name, valid.shape[1]) == "float16" else value
        finite = torch.isfinite(stored).reshape(*valid.shape, -1).all(dim=-1)
        bad |= (~finite & valid).any(dim=1)
    return torch.nonzero(bad).flatten().tolist()


def pad_fields(
    fields: dict[str, torch.Tensor], rows: list[Row], valid: torch.Tensor, s: FieldSettings
) -> dict[str, np.ndarray]:
    """Zero padding positions, pad to seq_len, cast to storage dtypes; add ids, offsets, text."""
    n, width = valid.shape
    out: dict[str, Any] = {}
    for name, value in fields.items():
        pad_value = float("nan") if name == "target_logprob" else 0
        value = torch.where(
            valid.reshape(n, width, *([1] * (value.dim() - 2))), value, torch.full_like(value, pad_value)
        )
        value = F.pad(value, (0, 0) * (value.dim() - 2) + (0, s.seq_len - width), value=pad_value)
        out[name] = value.cpu().numpy().astype(field_dtype(name, s.seq_len))
    out["input_ids"] = np.zeros((n, s.seq_len), dtype=field_dtype("input_ids", s.seq_len))
    out["offsets"] = np.zeros((n, s.seq_len, 2), dtype=field_dtype("offsets", s.seq_len))
    for i, r in enumerate(rows):
        out["input_ids"][i, : len(r.input_ids)] = r.input_ids
        out["offsets"][i, : len(r.input_ids)] = r.offsets
    if s.packed:
        out["segment_ids"] = np.zeros((n, s.seq_len), dtype=field_dtype("segment_ids", s.seq_len))
        for i, r in enumerate(rows):
            if r.segment_ids is not None:
                out["segment_ids"][i, : len(r.segment_ids)] = r.segment_ids
    for name, values in (
        ("length", [len(r.input_ids) for r in rows]),
        ("row_id", [r.row_id for r in rows]),
        ("doc_id", [r.doc_id for r in rows]),
    ):
        out[name] = np.array(values, dtype=field_dtype(name, s.seq_len))
    out["text"] = np.array([r.text for r in rows], dtype=object)
    return out


def blank_rows(chunk: dict[str, np.ndarray], bad: list[int]) -> None:
    """[skip note] A non-finite row is kept in place (shapes are pre-sized) with length 0 and no data."""
    for name, value in chunk.items():
        if name in ("row_id", "doc_id", "text"):
            continue
        value[bad] = np.nan if name == "target_logprob" else 0


# [hidden-range note] Real teachers have outlier dimensions: Gemma 3's residual stream passes 65,504, the
# largest fp16, in its middle layers, so raw hidden states stored as fp16 become inf. Each hidden
# layer is therefore standardized per dimension, (h - mean) / std with statistics of the calibration
# rows, before the fp16 cast (and before the PCA, so that the basis is not spent on a few huge
# dimensions). Standardized values are O(1), so fp16 keeps its 11 significant bits on every
# dimension; bf16 would avoid the overflow without the standardization but keeps only 8 bits, and
# neither numpy nor zarr has a bf16 dtype. A position far outside the calibration range is clamped to
# the fp16 range instead of becoming inf. The statistics are stored (standardize/hidden/<l>/mean|std),
# so raw states can be recovered: h = stored * std + mean (without PCA). Prefix tokens (a BOS, see
# [input-as-trained note] in tokens.py) are left out of the statistics: the BOS is an attention sink
# whose hidden state is orders of magnitude larger than any text token's, and it is never aligned.


def text_positions(rows: list[Row], width: int) -> torch.Tensor:
    """(B, width) bool: the positions of text tokens, without padding and prefix tokens (span (0, 0))."""
    text = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        text[i, : len(r.input_ids)] = torch.from_numpy(np.asarray(r.offsets)[:, 1] > 0)
    return text


def field_settings(layout: dict[str, Any], root: Any, device: torch.device) -> FieldSettings:
    """What to compute per row, from a store's layout and its fitted reductions (the live teacher uses it too).

    ``root``: the store's zarr group, or any mapping of its store-level arrays (a new store's calibration: those
    it fitted; None before it has any: no reductions, no rank table)."""
    root = {} if root is None else root
    return FieldSettings(
        seq_len=layout["seq_len"],
        top_k=layout["top_k"],
        temperatures=layout["temperatures"],
        vocab_proj_temperature=layout["vocab_proj_temperature"],
        hidden_layers=layout["hidden_layers"],
        attention_layers=layout["attention_layers"],
        attention_topk=layout["attention_topk"],
        pca=load_root_pairs(root, PCA_GROUP, ("mean", "components"), layout["hidden_layers"], device),
        vocab_proj=layout.get("vocab_proj", True),
        standardize=load_root_pairs(root, STANDARDIZE_GROUP, ("mean", "std"), layout["hidden_layers"], device),
        packed=layout.get("packing", "none") != "none",
        targets=layout["targets"] if kind_of(layout).compact else None,
        rank_of_id=load_rank_of_id(root, layout, device),
    )


def load_rank_of_id(root: Any, layout: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """(V,) int64 rank of each teacher id, the inverse of the store's ``targets/id_by_rank`` (compact kinds)."""
    if not kind_of(layout).compact or ID_BY_RANK not in root:
        return None
    id_by_rank = torch.from_numpy(np.asarray(root[ID_BY_RANK][:]).astype(np.int64))
    rank_of_id = torch.empty_like(id_by_rank)
    rank_of_id[id_by_rank] = torch.arange(id_by_rank.numel())
    return rank_of_id.to(device)


def load_root_pairs(
    root: Any, group: str, names: tuple[str, str], hidden_layers: list[int], device: torch.device
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (the layer's array names[0] of ``group``, names[1])}`` for the layers that have them."""
    pairs = {}
    for layer in hidden_layers:
        paths = [root_array_path(group, layer, name) for name in names]
        if all(path in root for path in paths):
            pairs[layer] = tuple(torch.from_numpy(np.asarray(root[path][:])).to(device) for path in paths)
    return pairs
