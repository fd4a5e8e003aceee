"""The kd term for sampled teacher targets (``--targets sampled|hybrid``): an unbiased estimate of the full KL.

[unbiased-kd note] A store of kind ``sampled`` holds, per position, the distinct ids of n draws from the
teacher's T=1 distribution q with their counts c_v; ``hybrid`` holds an exact head H plus n draws from the tail
renormalized, q_v = t_1(v) / r_1 for v not in H, r_1 = 1 - Σ_H t_1. With t_T the teacher's distribution at T,
the weights

    w_v = t_T(v)                               v in the exact head
    w_v = (c_v / n) · t_T(v) / q_v             v drawn  (= m_v · t_T(v), m from ``decode_targets``)

satisfy E[w_v] = t_T(v) for every token v (E[c_v / n] = q_v), so for any function f,
E[Σ_v w_v f(v)] = Σ_v t_T(v) f(v). With f = log t_T - log s_T (s the student at T), the loss

    L = T² · Σ_v w_v (log t_T(v) - log s_T(v))

is an unbiased estimate of T² · KL(t_T ‖ s_T), and, f being linear in log s, its gradient with respect to the
student's logits is an unbiased estimate of the full KL's gradient. At T=1 a drawn weight is c_v / n (times r_1
for the hybrid tail), which no stored logit enters. At another T the ratio t_T / q re-weights draws made at
T=1: still unbiased where the logit is stored exactly, but with 3-27x the gradient variance of drawing at T,
and biased where a drawn logit more than 25.5 nats below the max was clamped (cache/targets.py). So stage 2
refuses T != 1 for these kinds (``terms.check_kd_targets``). A top-K head alone has no such
property: its K+1-bin KL ignores how the student spreads the tail, and a renormalized top-K moves the head's
targets. tests/test_sampled_kd.py checks both by Monte Carlo. A single estimate can be negative; its mean
over positions is not, in expectation, with one tokenizer. Teacher tokens with no student token (id -1 after
the vocabulary map) are left out: the gradient is then the cross-entropy's towards the matched tokens' teacher
probabilities (its optimum puts the student's mass on them in the teacher's proportions), and the value, a KL
against a target of mass < 1, can read below 0 when the student gives the matched tokens more than the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_kd_rows(
    s_logp: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    multiplier: Tensor,
    teacher_lse: Tensor,
    temperature: float,
) -> Tensor:
    """Per-row estimate Σ_v w_v (log t_T(v) - log s_T(v)) of KL(t_T ‖ s_T), (N,) (without T²).

    s_logp: (N, S) student log-probs at T of the ids (any value where ids < 0); teacher_ids: (N, S) student ids,
    -1 = none; teacher_logits: (N, S) teacher logits at T=1; multiplier: (N, S) m of ``decode_targets`` (0 on unused
    slots); teacher_lse: (N,) logsumexp of the full teacher logits / T.
    """
    t_logp = teacher_logits.float() / temperature - teacher_lse.float().unsqueeze(-1)  # (N, S)
    weight = multiplier.float() * t_logp.exp()
    use = (teacher_ids >= 0) & (weight > 0)
    return torch.where(use, weight * (t_logp - s_logp), 0.0).sum(dim=-1)


def sampled_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    multiplier: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """T² · mean over positions of the unbiased KL estimate ([unbiased-kd note]).

    Args:
        student_logits: (N, Vs) any float dtype.
        teacher_ids: (N, S) int64 stored ids mapped into the student vocabulary, -1 = none; distinct per row.
        teacher_logits: (N, S) teacher logits at T=1 of those ids (decoded).
        multiplier: (N, S) fp32 from ``decode_targets``: 1 on exact slots, (c/n)/q on drawn ones, 0 unused.
        teacher_lse: (N,) fp32 full-vocabulary logsumexp of teacher logits / T.
        temperature: T, one the store holds lse for.
        mask: (N,) bool rows to score; None = all.
    Returns a scalar; 0 (in the graph) when no row is scored.
    """
    if mask is not None:
        keep = mask.reshape(-1).bool()
        student_logits, teacher_ids, teacher_logits = student_logits[keep], teacher_ids[keep], teacher_logits[keep]
        multiplier, teacher_lse = multiplier[keep], teacher_lse[keep]
    if student_logits.shape[0] == 0:
        return student_logits.reshape(-1)[:0].float().sum()
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, Vs)
    s_logp = student_logp.gather(1, teacher_ids.long().clamp(min=0))  # (N, S)
    rows = sampled_kd_rows(s_logp, teacher_ids, teacher_logits, multiplier, teacher_lse, temperature)
    return rows.mean() * temperature**2
