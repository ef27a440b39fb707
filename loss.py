"""GRPO / GSPO losses with KL, entropy and LLDS, as pure tensor functions (docs/protocol.md §4 and §5).

The objective for one mini-batch (what `compute_loss` returns, to be minimised):

    L = PG  -  ent_coef * H  +  kl_coef * KL  +  L_LLDS

    PG   = agg_t max(-A_i r_t, -A_i clip(r_t, 1 - clip_low, 1 + clip_high))   [A_i < 0: min(., -dual_clip A_i)]
    r_t  = exp(clamp(lp_t - old_t, -20, 20))                       ratio_level="token"   (GRPO)
         = exp(clamp(sg[log s_i] + lp_t - sg[lp_t], -20, 20))      ratio_level="sequence" (GSPO-token form)
    log s_i = sum_t m_t (lp_t - old_t) / sum_t m_t
    H    = sum_t m_t H_t / N,   KL = sum_t m_t k(lp_t - ref_t) / N,   N = num_tokens or sum(m)
    L_LLDS = sum_t coef_t g_t max(0, delta_t) m_t 1[A_i >= 0] / N,   delta_t = old_t - lp_t,
             g_t = 1[sum of delta over the action holding t > 0] (detached)

Symbols -> variables: lp = `logp` (B, T), old = `old_logp` (B, T), ref = `ref_logp` (B, T), m = `mask` (B, T),
A_i = `advantages` (B,), H_t = `entropy` (B, T) from `entropy_from_logits(logits / temperature)`,
coef_t = `coef` (or min(`answer_coef`, `coef`) where `answer_mask` is 1), sg[.] = `.detach()`.

Micro-batching: pass `num_tokens` (masked tokens of the whole mini-batch), `num_seqs` (its rows) and a constant
`norm_len`; then the losses of the micro-batches sum to the mini-batch loss, gradients included.
Metrics are plain floats from ONE device sync per call; `REDUCE` (below `compute_loss`) says how each one combines
over micro-batches, mini-batches and ranks.

Departures from the papers and from Search-R1 (veRL 0.1 `core_algos.py` / `dp_actor.py`, LLDS code):
 1. Micro-batch exactness: every term divides by the whole mini-batch's `num_tokens` / `num_seqs`. Search-R1
    takes a masked mean per micro-batch and divides by the number of micro-batches, which weights micro-batches
    equally instead of tokens, so its result depends on how the mini-batch was split.
 2. The log-ratio is clamped to [-20, 20] before exp (docs/protocol.md §4); Search-R1 clamps the ratio after exp to
    [-100, 100]. Identical while |lp - old| < 4.6; ours cannot overflow.
 3. Positions with mask 0 are set to 0 (torch.where) before any arithmetic, so inf/NaN in padding reach neither
    the loss nor the gradient; Search-R1 multiplies by the mask (NaN * 0 = NaN).
 4. group_advantages raises on a group of size 1; Search-R1 silently uses mean 0, std 1 there (A = R).
 5. GSPO is the GSPO-token form (as veRL's gspo loss): its value and gradient equal sequence-level GSPO for
    every `agg` here, since each weights the tokens of a row equally. GSPO's paper objective (one term per
    response) is agg="seq-mean-token-mean"; token-mean weights responses by length. veRL clamps at 10 only.
 6. The default agg "token-mean" follows Search-R1/veRL, not the GRPO paper (its per-response mean is
    "seq-mean-token-mean"). In "seq-mean-token-mean" a row with an empty mask adds 0 and still counts in
    `num_seqs` (old veRL gives NaN, newer veRL drops it), so `num_seqs` is simply the number of rows.
 7. "seq-mean-token-sum-norm" (Dr. GRPO) divides by `norm_len`, default the mask's width; Dr. GRPO uses the
    generation budget. Pass a constant: micro-batches trimmed to different widths otherwise disagree.
 8. KL and entropy are masked token means with the token-mean denominator whatever `agg` is (as Search-R1).
 9. LLDS `answer_mask` is 1 ON the answer span (those tokens get min(answer_coef, coef)); the LLDS code's
    `answer_mask` is 1 OFF the span. Same coefficients, inverted flag. The adaptive weight is the caller's.
10. Entropy is computed in float32 (float64 stays) in row chunks, recomputed in backward, whatever the logits
    dtype; veRL computes it on the whole logits tensor at once.
11. Metrics: separate low/high/dual clip fractions (veRL: one pg_clipfrac); train/approx_kl_old is the k3
    estimator mean(r - 1 - log r) over tokens (veRL logs mean(old - lp)).
"""
import torch
import torch.utils.checkpoint

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_btb(logp, old_logp, advantages, mask) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp: expected shape (B, T), got {tuple(logp.shape)}")
    _check("old_logp", old_logp, logp.shape)
    _check("mask", mask, logp.shape)
    _check("advantages", advantages, logp.shape[:1])


def actions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The actions of each row (docs/protocol.md §5): maximal runs of consecutive loss-mask tokens, one model turn
    between tool calls each. Returns ids (B, T) long, k = 1, 2, ... on the tokens of a row's k-th action and 0 off
    the mask, and starts (B, T) bool, True on the first token of each action. LLDS gates by them and the LLD
    monitor (train.py) counts them."""
    on = mask.bool()  # (B, T)
    starts = on & ~torch.nn.functional.pad(on[:, :-1], (1, 0), value=False)  # (B, T)
    return torch.where(on, starts.long().cumsum(-1), 0), starts


def action_sums(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of x (B, T) over each action of `ids` (from `actions`) -> (B, T+1): column k is the k-th action's sum,
    column 0 collects nothing but zeros (the off-mask tokens)."""
    return x.new_zeros(x.shape[0], x.shape[1] + 1).scatter_add_(1, ids, torch.where(ids > 0, x, 0.0))


def _denom(num_tokens, on: torch.Tensor):
    # At least 1, so an all-empty mask gives loss 0 rather than NaN. A tensor count stays on its device (no sync).
    if num_tokens is None:
        return on.sum().clamp(min=1)
    return num_tokens.clamp(min=1) if torch.is_tensor(num_tokens) else max(float(num_tokens), 1.0)


def _dtype(logp: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logp.dtype, torch.float32)  # bf16/fp16 log-probs: the loss math runs in fp32


def _floats(metrics: dict) -> dict:
    # One device sync for all metrics, instead of one .item() each.
    with torch.no_grad():
        vals = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, vals))


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + eps), std unbiased; without the division when scale_by_std=False."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape (N,), got {tuple(rewards.shape)}")
    _check("group_ids", group_ids, rewards.shape)
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    uniq, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        lone = uniq[counts < 2][0].item()
        raise ValueError(f"group_ids: group {lone} has a single response; GRPO needs at least 2 per group")
    counts = counts.to(rewards.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inv, rewards) / counts  # (G,)
    centered = rewards - mean[inv]  # (N,)
    if not scale_by_std:
        return centered
    std = (torch.zeros_like(counts).index_add_(0, inv, centered ** 2) / (counts - 1)).sqrt()  # (G,)
    return centered / (std[inv] + eps)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate with x = logp - ref_logp: k1 x, k2 x^2/2, k3 exp(-x) + x - 1 clamped to [-10, 10]."""
    _check("ref_logp", ref_logp, logp.shape)
    _check_choice("kind", kind, ("k1", "k2", "k3"))
    x = logp - ref_logp  # (B, T)
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x.square()
    return (torch.exp(-x) + x - 1).clamp(-10.0, 10.0)


def _entropy_chunk(z: torch.Tensor) -> torch.Tensor:
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # (n, V), upcast of one chunk only
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)  # (n,)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy over the full vocabulary, (..., V) -> (...); divide logits by the temperature first.

    Rows are processed `chunk_size` at a time, so float copies are (chunk_size, V) rather than the whole
    tensor; with grad, each chunk is recomputed in backward instead of keeping its softmax alive.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = [torch.utils.checkpoint.checkpoint(_entropy_chunk, c, use_reentrant=False) if grad
           else _entropy_chunk(c) for c in flat.split(chunk_size)]
    return torch.cat(out).reshape(logits.shape[:-1])


def _aggregate(x, on, agg, num_tokens, num_seqs, norm_len):
    """x (B, T) already 0 where the mask `on` is False -> scalar."""
    if agg == "token-mean":
        return x.sum() / _denom(num_tokens, on)
    row = x.sum(-1)  # (B,)
    if agg == "seq-mean-token-mean":
        row = row / on.sum(-1).clamp(min=1)
    else:
        row = row / float(norm_len if norm_len is not None else on.shape[-1])
    return row.sum() / float(num_seqs if num_seqs is not None else on.shape[0])


def _policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, ratio_level, agg,
                 num_tokens, num_seqs, norm_len):
    _check_btb(logp, old_logp, advantages, mask)
    _check_choice("ratio_level", ratio_level, ("token", "sequence"))
    _check_choice("agg", agg, AGGS)
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip: must be > 1 (the usual value is 3), got {dual_clip}")
    on, dt = mask.bool(), _dtype(logp)  # (B, T)
    lp = torch.where(on, logp.to(dt), 0.0)  # (B, T); padding can hold anything
    old = torch.where(on, old_logp.detach().to(dt), 0.0)  # (B, T)
    adv = advantages.detach().to(dt)[:, None]  # (B, 1)
    tok_log_ratio = lp - old  # (B, T)
    if ratio_level == "token":
        log_ratio = tok_log_ratio
    else:  # GSPO-token: the value is log s_i on every token, the gradient flows through each token's lp
        log_s = tok_log_ratio.sum(-1) / on.sum(-1).clamp(min=1)  # (B,)
        log_s = log_s.detach()[:, None] + lp - lp.detach()  # (B, T)
        log_ratio = torch.where(on, log_s, 0.0)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # (B, T)
    unclipped = -adv * ratio
    pg = torch.maximum(unclipped, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))  # (B, T)
    if dual_clip is not None:
        pg_dual = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    else:
        pg_dual = pg
    pg_dual = torch.where(on, pg_dual, 0.0)
    loss = _aggregate(pg_dual, on, agg, num_tokens, num_seqs, norm_len)

    with torch.no_grad():
        n = on.sum()
        n1 = n.clamp(min=1).to(dt)
        one = torch.ones((), dtype=dt, device=logp.device)
        r = tok_log_ratio.clamp(-20.0, 20.0)
        metrics = {
            "train/pg_loss": loss,
            "train/tokens": n,
            "train/clipfrac_low": ((ratio < 1.0 - clip_low) & (adv < 0) & on).sum() / n1,
            "train/clipfrac_high": ((ratio > 1.0 + clip_high) & (adv > 0) & on).sum() / n1,
            "train/clipfrac_dual": ((pg_dual < pg) & on).sum() / n1,
            "train/ratio_mean": (ratio * on).sum() / n1,
            "train/ratio_min": torch.where(n > 0, torch.where(on, ratio, float("inf")).min(), one),
            "train/ratio_max": torch.where(n > 0, torch.where(on, ratio, float("-inf")).max(), one),
            "train/approx_kl_old": (torch.where(on, r.exp() - 1 - r, 0.0)).sum() / n1,
        }
    return loss, metrics


def _llds_loss(logp, old_logp, advantages, mask, gate, coef, answer_mask, answer_coef, num_tokens):
    _check_btb(logp, old_logp, advantages, mask)
    _check_choice("gate", gate, ("action", "response"))
    if answer_mask is not None:
        _check("answer_mask", answer_mask, logp.shape)
    elif answer_coef is not None:
        raise ValueError("answer_mask: required when answer_coef is given (1 on the answer span's tokens)")
    on = mask.bool()  # (B, T)
    dt = _dtype(logp)
    delta = torch.where(on, old_logp.detach().to(dt) - logp.to(dt), 0.0)  # (B, T); > 0: likelihood fell
    keep = on & (advantages.detach() >= 0)[:, None]  # (B, T) preserving set
    with torch.no_grad():
        act_id, first = actions(on)  # (B, T) x2
        if gate == "response":  # the whole response is one action
            act_id, first = (act_id > 0).long(), first & (act_id == 1)
        sums = action_sums(delta.detach(), act_id)  # (B, T+1)
        g = (sums.gather(1, act_id) > 0) & keep  # (B, T) gate of each token's action, off the mask False
    c = coef
    if answer_mask is not None and answer_coef is not None:
        c = torch.full_like(delta, coef).masked_fill_(answer_mask.bool(), min(answer_coef, coef))  # (B, T)
    loss = (c * torch.where(g, torch.relu(delta), 0.0)).sum() / _denom(num_tokens, on)

    with torch.no_grad():
        n_keep = keep.sum()
        n_act = (first & keep).sum()
        n_gated = (first & g).sum()
        metrics = {
            "llds/penalty": loss,
            "llds/preserving_tokens": n_keep,
            "llds/actions": n_act,
            "llds/gated_actions": n_gated,
            "llds/gated_share": n_gated / n_act.clamp(min=1),
            "llds/mean_pos_delta": torch.where(keep, torch.relu(delta), 0.0).sum() / n_keep.clamp(min=1),
        }
    return loss, metrics


def compute_loss(logp, old_logp, advantages, mask, *, ref_logp=None, entropy=None, clip_low=0.2,
                 clip_high=0.2, dual_clip=None, ratio_level="token", agg="token-mean", kl_coef=0.0,
                 kl_kind="k3", ent_coef=0.0, llds_coef=0.0, llds_gate="action", answer_mask=None,
                 answer_coef=None, num_tokens=None, num_seqs=None, norm_len=None):
    """L = PG - ent_coef * H + kl_coef * KL + L_LLDS (docs/protocol.md §4). Each term off at coefficient 0, adding
    nothing."""
    loss, metrics = _policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                                 ratio_level, agg, num_tokens, num_seqs, norm_len)
    on = mask.bool()
    n1 = on.sum().clamp(min=1)
    if kl_coef and ref_logp is None:
        raise ValueError("ref_logp: required when kl_coef != 0 (log-probs of the frozen reference model)")
    if ent_coef and entropy is None:
        raise ValueError("entropy: required when ent_coef != 0 (per-token entropy_from_logits, with grad)")
    if ref_logp is not None:
        _check("ref_logp", ref_logp, logp.shape)
        # Zeroed inputs (not outputs) at padding: 0 * exp(inf) in backward would be NaN.
        lp, ref = torch.where(on, logp.to(_dtype(logp)), 0.0), torch.where(on, ref_logp.detach(), 0.0)
        kl = kl_penalty(lp, ref.to(lp.dtype), kl_kind)  # (B, T)
        metrics["train/kl_ref"] = kl.detach().sum() / n1
        if kl_coef:
            loss = loss + kl_coef * kl.sum() / _denom(num_tokens, on)
    if entropy is not None:
        _check("entropy", entropy, logp.shape)
        ent = torch.where(on, entropy, 0.0)  # (B, T)
        metrics["train/entropy"] = ent.detach().sum() / n1
        if ent_coef:
            loss = loss - ent_coef * ent.sum() / _denom(num_tokens, on)
    if llds_coef:
        llds, llds_metrics = _llds_loss(logp, old_logp, advantages, mask, llds_gate, llds_coef, answer_mask,
                                        answer_coef, num_tokens)
        loss = loss + llds
        metrics.update(llds_metrics)
    metrics["train/loss"] = loss
    return loss, _floats(metrics)


# How each metric of compute_loss combines over the micro-batches of a mini-batch, the mini-batches (optimiser
# steps) of a training step and the ranks; train.update applies it, and every key compute_loss returns is here:
#   "sum"            loss terms and counts: added up within a mini-batch (micro-batches and ranks), then averaged
#                    over the step's optimiser steps;
#   "max" / "min"    over every micro-batch of every rank (a micro-batch without tokens adds nothing);
#   another key      a token mean: averaged weighted by that count (train/tokens: the micro-batch's mask tokens).
# The LLD monitor's metrics (train.py) are ratios of sums too (utils.Meter: numerator and denominator each summed
# over ranks).
REDUCE = {
    "train/loss": "sum", "train/pg_loss": "sum", "llds/penalty": "sum",
    "train/tokens": "sum", "llds/preserving_tokens": "sum", "llds/actions": "sum", "llds/gated_actions": "sum",
    "train/ratio_max": "max", "train/ratio_min": "min",
    "train/clipfrac_low": "train/tokens", "train/clipfrac_high": "train/tokens", "train/clipfrac_dual": "train/tokens",
    "train/ratio_mean": "train/tokens", "train/approx_kl_old": "train/tokens", "train/kl_ref": "train/tokens",
    "train/entropy": "train/tokens",
    "llds/gated_share": "llds/actions", "llds/mean_pos_delta": "llds/preserving_tokens",
}
