"""loss.py against hand-computed numbers, gradcheck in float64, micro-batch exactness and edge cases."""
import math

import pytest
import torch

import loss as L

D = torch.float64


def t(x, dtype=D, **kw):
    return torch.tensor(x, dtype=dtype, **kw)


def close(a, b, tol=1e-9):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=tol)


def pg_loss(logp, old_logp, advantages, mask, **kw):
    """The clipped surrogate alone, through the one entry point train.py calls: compute_loss with every other
    term at its default coefficient 0 -> (loss, metrics)."""
    return L.compute_loss(logp, old_logp, advantages, mask, **kw)


def llds_loss(lp, old, adv, mask, gate="action", coef=0.2, answer_mask=None, answer_coef=None, num_tokens=None):
    """The LLDS term alone, through compute_loss: the loss with LLDS at `coef` minus the same loss with LLDS off
    (the policy term is computed identically in both), and the metrics of the first -> (loss, metrics)."""
    kw = dict(answer_mask=answer_mask, answer_coef=answer_coef, num_tokens=num_tokens)
    with_llds, m = L.compute_loss(lp, old, adv, mask, llds_coef=coef, llds_gate=gate, **kw)
    without, _ = L.compute_loss(lp, old, adv, mask, **kw)
    return with_llds - without, m


# ---------------------------------------------------------------- group advantages

def test_group_advantages_hand_values_non_contiguous_groups():
    # group 0: rewards 1,0,0,1 -> mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    # group 3: 0,0,0 (all equal) -> 0 everywhere (0 / (0 + eps))
    # group 9: 5,7 -> mean 6, var = (1 + 1) / 1 = 2, std = 1.4142136
    rewards = t([1.0, 0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 7.0, 0.0])
    gids = torch.tensor([0, 3, 9, 0, 3, 0, 3, 9, 0])
    s0, s9 = math.sqrt(1 / 3) + 1e-6, math.sqrt(2) + 1e-6
    want = [0.5 / s0, 0.0, -1 / s9, -0.5 / s0, 0.0, 0.5 / s0, 0.0, 1 / s9, -0.5 / s0]
    assert close(L.group_advantages(rewards, gids), want, 1e-12)
    # Dr. GRPO: no std division
    want_nostd = [0.5, 0.0, -1.0, -0.5, 0.0, 0.5, 0.0, 1.0, -0.5]
    assert close(L.group_advantages(rewards, gids, scale_by_std=False), want_nostd, 1e-12)


def test_group_advantages_equal_rewards_give_zero():
    adv = L.group_advantages(t([1.0] * 5 + [0.0] * 5), torch.tensor([4] * 5 + [2] * 5))
    assert torch.equal(adv, torch.zeros(10, dtype=D))


def test_group_advantages_eps_and_int_rewards():
    # rewards 0,1 -> mean .5, std sqrt(.5) = .70710678; eps = 0.1 -> .5 / .80710678 = .6195
    adv = L.group_advantages(torch.tensor([0, 1]), torch.tensor([7, 7]), eps=0.1)
    assert adv.dtype == torch.float32
    assert close(adv, [-0.5 / (math.sqrt(0.5) + 0.1), 0.5 / (math.sqrt(0.5) + 0.1)], 1e-6)


def test_group_advantages_lone_group_and_shapes_raise():
    with pytest.raises(ValueError, match="group 42"):
        L.group_advantages(t([1.0, 0.0, 1.0]), torch.tensor([1, 1, 42]))
    with pytest.raises(ValueError, match="group_ids"):
        L.group_advantages(t([1.0, 0.0, 1.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="rewards"):
        L.group_advantages(t([[1.0, 0.0]]), torch.tensor([1, 1]))


# ---------------------------------------------------------------- KL and entropy

def test_kl_penalty_hand_values():
    lp, ref = t([[0.0, -1.0, -20.0, 12.0]]), t([[-1.0, 0.0, 0.0, 0.0]])
    # x = lp - ref = [1, -1, -20, 12]
    assert close(L.kl_penalty(lp, ref, "k1"), [[1.0, -1.0, -20.0, 12.0]])
    assert close(L.kl_penalty(lp, ref, "k2"), [[0.5, 0.5, 200.0, 72.0]])
    # k3 = exp(-x) + x - 1: e^-1 = .367879; e - 2 = .718282; e^20 - 21 -> clamp 10; e^-12 + 11 -> clamp 10
    assert close(L.kl_penalty(lp, ref, "k3"), [[math.exp(-1), math.e - 2, 10.0, 10.0]])
    with pytest.raises(ValueError, match="kind"):
        L.kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        L.kl_penalty(lp, ref[:, :3], "k3")


def test_kl_penalty_gradcheck():
    lp = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = torch.randn(2, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda x: L.kl_penalty(x, ref, kind), (lp,))


def test_entropy_hand_values_and_against_categorical():
    logits = t([[[0.0, 0.0, -1e9], [0.0, math.log(3.0), -1e9]]])
    # [1/2, 1/2, 0] -> ln 2 = .693147; [1/4, 3/4, 0] -> -(.25 ln .25 + .75 ln .75) = .562335
    want = [[math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]
    assert close(L.entropy_from_logits(logits), want, 1e-12)
    z = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Categorical(logits=z).entropy()
    assert torch.allclose(L.entropy_from_logits(z), ref, atol=1e-5)
    # bf16 logits come back as float32 entropy of the same values
    zb = z.to(torch.bfloat16)
    hb = L.entropy_from_logits(zb)
    assert hb.dtype == torch.float32 and hb.shape == (3, 5)
    assert torch.allclose(hb, torch.distributions.Categorical(logits=zb.float()).entropy(), atol=1e-5)


def test_entropy_chunks_equal_one_piece_with_grad_and_gradcheck():
    z = torch.randn(2, 7, 6, dtype=D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(2, 7, dtype=D, generator=torch.Generator().manual_seed(3))
    h1 = L.entropy_from_logits(z, chunk_size=3)  # 14 rows in chunks of 3, recomputed in backward
    (g1,) = torch.autograd.grad((h1 * w).sum(), z)
    h2 = L.entropy_from_logits(z, chunk_size=1000)
    (g2,) = torch.autograd.grad((h2 * w).sum(), z)
    assert torch.allclose(h1, h2, atol=1e-14) and torch.allclose(g1, g2, atol=1e-14)
    small = z.detach()[:1, :5, :4].clone().requires_grad_(True)  # 5 rows in chunks of 2: 20 inputs
    assert torch.autograd.gradcheck(lambda x: L.entropy_from_logits(x, chunk_size=2), (small,))
    with torch.no_grad():
        assert torch.allclose(L.entropy_from_logits(z, chunk_size=3), h2, atol=1e-14)


# ---------------------------------------------------------------- policy loss

def _pg_case():
    # ratios r = [[1.0, 1.5, (masked)], [0.7, 1.1, 2.0]], A = [+1, -2], eps 0.2 both sides
    ratios = t([[1.0, 1.5, 3.0], [0.7, 1.1, 2.0]])
    old = t([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.5]])
    lp = (old + ratios.log()).requires_grad_(True)
    return lp, old, t([1.0, -2.0]), t([[1, 1, 0], [1, 1, 1]])


def test_policy_loss_token_hand_values_all_aggs():
    lp, old, adv, mask = _pg_case()
    # per token max(-A r, -A clip(r, .8, 1.2)):
    #   row 0 (A=+1): r=1 -> -1 ; r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped high)
    #   row 1 (A=-2): r=.7 -> max(1.4, 1.6) = 1.6 (clipped low) ; r=1.1 -> 2.2 ; r=2 -> max(4, 2.4) = 4.0
    # token-mean: (-1 - 1.2 + 1.6 + 2.2 + 4.0) / 5 = 5.6 / 5 = 1.12
    loss, m = pg_loss(lp, old, adv, mask)
    assert close(loss, 1.12)
    # seq-mean-token-mean: (-2.2 / 2 + 7.8 / 3) / 2 = (-1.1 + 2.6) / 2 = 0.75
    assert close(pg_loss(lp, old, adv, mask, agg="seq-mean-token-mean")[0], 0.75)
    # seq-mean-token-sum-norm, norm_len = width 3: (-2.2 / 3 + 7.8 / 3) / 2 = 5.6 / 6
    assert close(pg_loss(lp, old, adv, mask, agg="seq-mean-token-sum-norm")[0], 5.6 / 6)
    # ... with norm_len = 10 and num_seqs = 4: (-2.2 + 7.8) / 10 / 4 = 0.14
    assert close(pg_loss(lp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_len=10, num_seqs=4)[0], 0.14)
    # token-mean with num_tokens = 8: 5.6 / 8 = 0.7
    assert close(pg_loss(lp, old, adv, mask, num_tokens=8)[0], 0.7)
    # metrics over the 5 masked tokens: low clip (1,0), high clip (0,1) -> 1/5 each
    assert close(m["train/clipfrac_low"], 0.2) and close(m["train/clipfrac_high"], 0.2)
    assert m["train/clipfrac_dual"] == 0.0 and m["train/tokens"] == 5.0
    assert close(m["train/ratio_mean"], (1 + 1.5 + 0.7 + 1.1 + 2.0) / 5)  # 1.26 (masked 3.0 excluded)
    assert close(m["train/ratio_min"], 0.7) and close(m["train/ratio_max"], 2.0)
    # k3 of the old policy: mean(r - 1 - ln r) = (0 + .5 - ln 1.5 - .3 - ln .7 + .1 - ln 1.1 + 1 - ln 2) / 5
    k3 = sum(r - 1 - math.log(r) for r in (1.0, 1.5, 0.7, 1.1, 2.0)) / 5
    assert close(m["train/approx_kl_old"], k3) and close(m["train/pg_loss"], 1.12)
    assert all(isinstance(v, float) for v in m.values())


def test_policy_loss_asymmetric_clip():
    lp, old, adv, mask = _pg_case()
    # clip_high .28 (DAPO): r=1.5, A=+1 -> max(-1.5, -1.28) = -1.28: (-1 - 1.28 + 1.6 + 2.2 + 4) / 5 = 5.52 / 5
    loss, m = pg_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert close(loss, 1.104) and close(m["train/clipfrac_high"], 0.2)
    # clip_low .1: r=.7, A=-2 -> max(1.4, 2 * .9) = 1.8: (-1 - 1.2 + 1.8 + 2.2 + 4) / 5 = 5.8 / 5
    assert close(pg_loss(lp, old, adv, mask, clip_low=0.1, clip_high=0.2)[0], 1.16)
    # clip_high .6: r=1.5 is inside, no high clipping: (-1 - 1.5 + 1.6 + 2.2 + 4) / 5 = 5.3 / 5
    loss, m = pg_loss(lp, old, adv, mask, clip_high=0.6)
    assert close(loss, 1.06) and m["train/clipfrac_high"] == 0.0


def test_clip_fractions_count_only_active_clips():
    # A=+1 with r=.5 and A=-1 with r=1.5 are outside the clip range but on the unclipped branch:
    # max(-.5, -.8) = -.5 and max(1.5, 1.2) = 1.5 -> no clip counted; mean (-.5 + 1.5) / 2 = .5
    old = t([[0.0], [0.0]])
    lp = t([[math.log(0.5)], [math.log(1.5)]])
    loss, m = pg_loss(lp, old, t([1.0, -1.0]), t([[1], [1]]))
    assert close(loss, 0.5) and m["train/clipfrac_low"] == 0.0 and m["train/clipfrac_high"] == 0.0


def test_half_precision_log_probs_run_in_float32():
    lp, old, adv, mask = _pg_case()
    lpb = lp.detach().to(torch.bfloat16).requires_grad_(True)
    loss, _ = L.compute_loss(lpb, old.float(), adv.float(), mask, ref_logp=old.float(), kl_coef=0.1, llds_coef=0.2)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lpb.grad.dtype == torch.bfloat16 and torch.isfinite(lpb.grad).all()


def test_policy_loss_token_gradient_by_hand():
    lp, old, adv, mask = _pg_case()
    loss, _ = pg_loss(lp, old, adv, mask)
    loss.backward()
    # d/dlp of -A r / 5 = -A r / 5 where unclipped, 0 where clipped or masked:
    #   (0,0): -1 * 1 / 5 = -.2 ; (1,1): 2 * 1.1 / 5 = .44 ; (1,2): 2 * 2 / 5 = .8
    assert close(lp.grad, [[-0.2, 0.0, 0.0], [0.0, 0.44, 0.8]])


def test_policy_loss_dual_clip_hand_values():
    lp, old, adv, mask = _pg_case()
    # c = 1.5: for A = -2 the loss is capped at -c A = 3: token r=2 goes 4.0 -> 3.0
    # token-mean: (-1 - 1.2 + 1.6 + 2.2 + 3.0) / 5 = 4.6 / 5 = 0.92 ; dual fraction 1/5
    loss, m = pg_loss(lp, old, adv, mask, dual_clip=1.5)
    assert close(loss, 0.92) and close(m["train/clipfrac_dual"], 0.2)
    loss.backward()
    assert close(lp.grad, [[-0.2, 0.0, 0.0], [0.0, 0.44, 0.0]])  # the capped token has no gradient
    with pytest.raises(ValueError, match="dual_clip"):
        pg_loss(lp, old, adv, mask, dual_clip=0.5)


def test_policy_loss_gspo_hand_values_and_gradient():
    # row 0 (A=+1): lp - old = [.1, .3, 5 (masked)] -> log s = .2, s = e^.2 = 1.2214 > 1.2 -> clipped: -1.2 per token
    # row 1 (A=-2): lp - old = [-.3, 0, -.3] -> log s = -.2, s = e^-.2 = .81873 in range: 2 s per token
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    lp = (old + t([[0.1, 0.3, 5.0], [-0.3, 0.0, -0.3]])).requires_grad_(True)
    adv, mask = t([1.0, -2.0]), t([[1, 1, 0], [1, 1, 1]])
    s1 = math.exp(-0.2)
    loss, m = pg_loss(lp, old, adv, mask, ratio_level="sequence")
    # token-mean: (2 * -1.2 + 3 * 2 s1) / 5
    assert close(loss, (-2.4 + 6 * s1) / 5)
    assert close(m["train/ratio_mean"], (2 * math.exp(0.2) + 3 * s1) / 5)
    assert close(m["train/clipfrac_high"], 0.4) and close(m["train/ratio_max"], math.exp(0.2))
    loss.backward()
    # row 0 clipped -> 0 ; row 1: d/dlp_t of 3 * 2 s1 / 5 with ds1/dlp_t = s1 / 3 -> 2 s1 / 5 = .327492 per token
    assert close(lp.grad, [[0.0, 0.0, 0.0], [2 * s1 / 5] * 3])
    # GSPO paper's objective (one term per response) = seq-mean-token-mean: (-1.2 + 2 s1) / 2
    assert close(pg_loss(lp, old, adv, mask, ratio_level="sequence", agg="seq-mean-token-mean")[0],
                 (-1.2 + 2 * s1) / 2)


def _random_case(seed, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, dtype=D, generator=g) * 3
    lp = (old + torch.randn(B, T, dtype=D, generator=g) * 0.3).requires_grad_(True)
    mask = t([[1, 1, 1, 0, 0, 1, 1],  # two actions split by an observation
              [0, 1, 1, 1, 1, 0, 0],
              [1, 0, 1, 1, 0, 1, 0],  # a lone-token action first
              [1, 1, 1, 1, 1, 1, 1]])[:B, :T]
    adv = t([0.8, -1.1, 0.0, 1.3])[:B]
    return lp, old, adv, mask


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", L.AGGS)
@pytest.mark.parametrize("dual_clip", [None, 1.2])
def test_policy_loss_gradcheck(ratio_level, agg, dual_clip):
    lp, old, adv, mask = _random_case(0)
    f = lambda x: pg_loss(x, old, adv, mask, ratio_level=ratio_level, agg=agg, dual_clip=dual_clip)[0]
    assert torch.autograd.gradcheck(f, (lp,))


def test_policy_loss_log_ratio_clamped_at_20():
    # lp - old = 30 and -30 with A = -1: r = exp(clamp(.)) = e^20 and e^-20; loss max(r, clip(r)) = e^20 and 0.8
    old = t([[0.0, 0.0]])
    lp = t([[30.0, -30.0]], requires_grad=True)
    loss, m = pg_loss(lp, old, t([-1.0]), t([[1, 1]]))
    assert close(loss, (math.exp(20) + 0.8) / 2, 1e-12) and close(m["train/ratio_max"], math.exp(20), 1e-12)
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2, dtype=D))  # outside the clamp, and clipped: no gradient


def test_policy_loss_empty_mask_rows():
    lp, old, adv, mask = _pg_case()
    mask2 = torch.cat([mask, torch.zeros(1, 3, dtype=D)])  # a third row with an empty mask
    lp2 = torch.cat([lp.detach(), t([[0.5, -40.0, float("nan")]])]).requires_grad_(True)  # garbage in it
    old2, adv2 = torch.cat([old, t([[float("-inf"), 0.0, 0.0]])]), t([1.0, -2.0, 3.0])
    loss, m = pg_loss(lp2, old2, adv2, mask2)
    assert close(loss, 1.12) and close(m["train/ratio_max"], 2.0)  # the empty row changes nothing
    loss.backward()
    assert torch.equal(lp2.grad[2], torch.zeros(3, dtype=D))
    # seq-mean-token-mean: the empty row counts in the denominator: (-1.1 + 2.6) / 3 = 0.5
    assert close(pg_loss(lp2, old2, adv2, mask2, agg="seq-mean-token-mean")[0], 0.5)
    # every term on: the garbage in the empty row (NaN, -inf, inf) reaches neither loss nor gradient
    ref2 = torch.cat([old, t([[float("inf"), float("-inf"), 0.0]])])
    ent2 = torch.cat([t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), t([[float("nan")] * 3])])
    lp2.grad = None
    loss, m = L.compute_loss(lp2, old2, adv2, mask2, ref_logp=ref2, entropy=ent2, kl_coef=0.1, ent_coef=0.01,
                             llds_coef=0.2)
    loss.backward()
    assert all(math.isfinite(v) for v in m.values()) and torch.isfinite(lp2.grad).all()
    assert torch.equal(lp2.grad[2], torch.zeros(3, dtype=D))
    # all masks empty: loss 0, metrics finite, gradient 0
    z = torch.zeros(3, 3, dtype=D)
    for agg in L.AGGS:
        loss, m = pg_loss(lp2, old2, adv2, z, agg=agg)
        assert loss.item() == 0.0 and all(math.isfinite(v) for v in m.values())
        lp2.grad = None
        loss.backward()
        assert torch.equal(lp2.grad, torch.zeros(3, 3, dtype=D))


def test_policy_loss_bad_inputs_raise():
    lp, old, adv, mask = _pg_case()
    for kw, name in ((dict(old_logp=old[:, :2]), "old_logp"), (dict(mask=mask[:1]), "mask"),
                     (dict(advantages=adv[:1]), "advantages"),
                     (dict(advantages=adv[:, None].expand(2, 3)), "advantages"), (dict(logp=lp[0]), "logp")):
        args = dict(logp=lp, old_logp=old, advantages=adv, mask=mask) | kw
        with pytest.raises(ValueError, match=name):
            pg_loss(**args)
    with pytest.raises(ValueError, match="agg"):
        pg_loss(lp, old, adv, mask, agg="token-sum")
    with pytest.raises(ValueError, match="ratio_level"):
        pg_loss(lp, old, adv, mask, ratio_level="seq")


# ---------------------------------------------------------------- LLDS

def test_actions_hand_values():
    # row 0: actions [1, -2] and [3, 4] around an observation; row 1: a lone token [-1], then [5, 5]
    x = torch.tensor([[1.0, -2.0, 9.0, 3.0, 4.0, 0.0], [-1.0, 5.0, 5.0, 5.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0]])
    ids, starts = L.actions(m)
    assert ids.tolist() == [[1, 1, 0, 2, 2, 0], [1, 0, 2, 2, 0, 0]]
    assert starts.tolist() == [[True, False, False, True, False, False], [True, False, True, False, False, False]]
    sums = L.action_sums(x, ids)
    assert sums[0, 1:3].tolist() == [-1.0, 7.0] and sums[1, 1:3].tolist() == [-1.0, 10.0]
    assert sums[:, 0].tolist() == [0.0, 0.0] and sums[:, 3:].abs().sum() == 0  # off-mask tokens add nothing
    assert starts.sum(1).tolist() == [2, 2] and ((sums[:, 1:] < 0) & (ids.max(1).values[:, None] >=
                                                 torch.arange(1, 7)[None])).sum().item() == 2  # 2 of 4 fell


def _llds_case():
    # delta = old - lp, chosen per token; masked positions hold garbage
    delta = t([[0.5, -0.2, 9.0, 9.0, -0.4, 0.2],    # A=+1: actions [.5, -.2] (sum .3) and [-.4, .2] (sum -.2)
               [7.0, 0.3, 7.0, 0.2, -0.1, 7.0],     # A=0: lone token [.3] and [.2, -.1] (sum .1)
               [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])     # A=-1: not preserving
    mask = t([[1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    old = t([[-1.0] * 6] * 3)
    lp = (old - delta).requires_grad_(True)
    return lp, old, t([1.0, 0.0, -1.0]), mask


def test_llds_action_gate_hand_values_and_gradient():
    lp, old, adv, mask = _llds_case()
    # gated actions: row 0 first action (relu: .5 + 0), row 1 both (.3 ; .2 + 0); row 0 second action closed
    # although its token .2 > 0. Sum of penalties = .5 + .3 + .2 = 1.0 over 10 mask tokens:
    # L = .2 * 1.0 / 10 = .02
    loss, m = llds_loss(lp, old, adv, mask)
    assert close(loss, 0.02)
    assert m["llds/preserving_tokens"] == 7.0  # 4 + 3
    assert m["llds/actions"] == 4.0 and m["llds/gated_actions"] == 3.0 and close(m["llds/gated_share"], 0.75)
    # positive displacement over preserving tokens: (.5 + .2 + .3 + .2) / 7
    assert close(m["llds/mean_pos_delta"], 1.2 / 7) and close(m["llds/penalty"], 0.02)
    loss.backward()
    # d/dlp of .2 * relu(old - lp) / 10 = -.02 on gated tokens with delta > 0
    want = torch.zeros(3, 6, dtype=D)
    want[0, 0] = want[1, 1] = want[1, 3] = -0.02
    assert close(lp.grad, want)


def test_llds_response_gate_hand_values():
    lp, old, adv, mask = _llds_case()
    # row 0: signed sum .5 - .2 - .4 + .2 = .1 > 0 -> open: relu .5 + .2 = .7 ; row 1: .3 + .2 - .1 = .4 -> .5
    # L = .2 * 1.2 / 10 = .024 ; 2 responses, both gated
    loss, m = llds_loss(lp, old, adv, mask, gate="response")
    assert close(loss, 0.024)
    assert m["llds/actions"] == 2.0 and m["llds/gated_actions"] == 2.0 and m["llds/gated_share"] == 1.0
    loss.backward()
    want = torch.zeros(3, 6, dtype=D)
    want[0, 0] = want[0, 5] = want[1, 1] = want[1, 3] = -0.02
    assert close(lp.grad, want)


def test_llds_answer_span_coefficient():
    lp, old, adv, mask = _llds_case()
    ans = torch.zeros(3, 6)
    ans[0, 0] = ans[1, 3] = 1
    # answer tokens get min(.05, .2) = .05: (.5 * .05 + .3 * .2 + .2 * .05) / 10 = (.025 + .06 + .01) / 10
    assert close(llds_loss(lp, old, adv, mask, answer_mask=ans, answer_coef=0.05)[0], 0.0095)
    # answer_coef above coef: min picks coef -> the plain value .02 ; answer_mask alone: plain value
    assert close(llds_loss(lp, old, adv, mask, answer_mask=ans, answer_coef=0.5)[0], 0.02)
    assert close(llds_loss(lp, old, adv, mask, answer_mask=ans)[0], 0.02)
    # num_tokens = 20 halves it: .2 * 1.0 / 20
    assert close(llds_loss(lp, old, adv, mask, num_tokens=20)[0], 0.01)


def test_llds_closed_gate_gives_zero_gradient():
    # one action, delta [.5, -.6]: signed sum -.1 <= 0 -> closed although token 0 lost likelihood
    old = t([[-1.0, -1.0]])
    lp = (old - t([[0.5, -0.6]])).requires_grad_(True)
    loss, m = llds_loss(lp, old, t([1.0]), t([[1, 1]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(1, 2, dtype=D))
    assert m["llds/actions"] == 1.0 and m["llds/gated_actions"] == 0.0 and close(m["llds/mean_pos_delta"], 0.25)
    # boundary: a signed sum of exactly 0 (delta .5 and -.5, exact in binary) keeps the gate closed
    lp = (old - t([[0.5, -0.5]])).requires_grad_(True)
    loss, m = llds_loss(lp, old, t([1.0]), t([[1, 1]]))
    loss.backward()
    assert loss.item() == 0.0 and m["llds/gated_actions"] == 0.0 and torch.equal(lp.grad, torch.zeros(1, 2, dtype=D))


def test_llds_zero_advantage_preserved_negative_not():
    old = t([[-1.0, -1.0]])
    lp = old - t([[0.5, 0.1]])
    # A = 0: preserving, L = .2 * .6 / 2 = .06 ; A = -1e-12: not preserving -> 0
    assert close(llds_loss(lp, old, t([0.0]), t([[1, 1]]))[0], 0.06)
    assert llds_loss(lp, old, t([-1e-12]), t([[1, 1]]))[0].item() == 0.0


def test_llds_all_advantages_negative():
    lp, old, _, mask = _llds_case()
    loss, m = llds_loss(lp, old, t([-1.0, -0.5, -2.0]), mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(3, 6, dtype=D))
    assert m["llds/preserving_tokens"] == 0.0 and m["llds/actions"] == 0.0 and m["llds/gated_share"] == 0.0


def test_llds_gradcheck_and_bad_inputs():
    lp, old, adv, mask = _random_case(1)
    ans = t([[0, 0, 0, 0, 0, 1, 1]] * 4)
    for gate in ("action", "response"):
        f = lambda x: llds_loss(x, old, adv, mask, gate=gate, answer_mask=ans, answer_coef=0.1)[0]
        assert torch.autograd.gradcheck(f, (lp,))
    with pytest.raises(ValueError, match="gate"):
        llds_loss(lp, old, adv, mask, gate="turn")
    with pytest.raises(ValueError, match="answer_mask"):
        llds_loss(lp, old, adv, mask, answer_mask=ans[:, :3], answer_coef=0.1)
    with pytest.raises(ValueError, match="answer_mask"):
        llds_loss(lp, old, adv, mask, answer_coef=0.1)
    with pytest.raises(ValueError, match="old_logp"):
        llds_loss(lp, old.T, adv, mask)


# ---------------------------------------------------------------- compute_loss and micro-batches

def test_compute_loss_off_switches_are_exactly_the_policy_term():
    for ratio_level in ("token", "sequence"):
        lp, old, adv, mask = _random_case(2)
        ref, ent = old - 0.1, torch.rand(4, 7, dtype=D, requires_grad=True)
        a, ma = L.compute_loss(lp, old, adv, mask, ratio_level=ratio_level)  # no reference, no entropy given
        (ga,) = torch.autograd.grad(a, lp)
        b, mb = L.compute_loss(lp, old, adv, mask, ref_logp=ref, entropy=ent, ratio_level=ratio_level,
                               answer_mask=torch.ones(4, 7), answer_coef=0.1)
        (gb,) = torch.autograd.grad(b, lp)
        assert torch.equal(a, b) and torch.equal(ga, gb)
        assert all(ma[k] == mb[k] for k in ma) and mb["train/loss"] == ma["train/pg_loss"]
        assert "llds/penalty" not in mb and "train/kl_ref" in mb and "train/entropy" in mb
    # an off term is not computed into the loss at all: non-finite inputs to it cannot leak in (0 * inf = NaN)
    ref[0, 0], ent_nan = float("inf"), torch.full((4, 7), float("nan"), dtype=D)
    b, mb = L.compute_loss(lp, old, adv, mask, ref_logp=ref, entropy=ent_nan, ratio_level=ratio_level)
    assert torch.equal(a, b) and math.isnan(mb["train/entropy"])


def test_compute_loss_total_hand_values():
    lp, old, adv, mask = _pg_case()  # policy term 1.12 over 5 tokens
    ref = lp.detach() - 1.0  # x = 1 everywhere: k3 = e^-1 = .367879 per token
    ent = t([[2.0, 4.0, 99.0], [1.0, 1.0, 2.0]])  # masked mean: 10 / 5 = 2
    # LLDS: old - lp = -ln r = [0, -.405, (masked)] row 0 (A=+1): the action's sum < 0 -> closed; row 1 A<0 -> 0
    loss, m = L.compute_loss(lp, old, adv, mask, ref_logp=ref, entropy=ent, kl_coef=0.1, ent_coef=0.01,
                             llds_coef=0.2)
    # 1.12 - .01 * 2 + .1 * e^-1 + 0
    assert close(loss, 1.12 - 0.02 + 0.1 * math.exp(-1))
    assert close(m["train/kl_ref"], math.exp(-1)) and close(m["train/entropy"], 2.0)
    assert m["llds/penalty"] == 0.0 and close(m["train/loss"], loss.item())
    with pytest.raises(ValueError, match="ref_logp"):
        L.compute_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        L.compute_loss(lp, old, adv, mask, ent_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        L.compute_loss(lp, old, adv, mask, entropy=ent[:, :2], ent_coef=0.1)
    with pytest.raises(ValueError, match="ref_logp"):
        L.compute_loss(lp, old, adv, mask, ref_logp=ref[:1], kl_coef=0.1)


def test_compute_loss_gradcheck_all_terms():
    lp, old, adv, mask = _random_case(3)
    ref = old + 0.2
    ent = torch.rand(4, 7, dtype=D, generator=torch.Generator().manual_seed(4), requires_grad=True)

    def f(x, h):
        return L.compute_loss(x, old, adv, mask, ref_logp=ref, entropy=h, kl_coef=0.3, ent_coef=0.05,
                              llds_coef=0.2, dual_clip=3.0)[0]
    assert torch.autograd.gradcheck(f, (lp, ent))


def _trim(x, width):
    return x[..., :width]


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", L.AGGS)
def test_micro_batches_sum_to_one_piece(agg, ratio_level):
    lp, old, adv, mask = _random_case(5)
    mask = mask.clone()
    mask[2, 4:] = 0  # rows 2-3 end by column 4, so their micro-batch can be trimmed to width 4
    mask[3, 3:] = 0
    ref = old + 0.1
    ent = torch.rand(4, 7, dtype=D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    kw = dict(ratio_level=ratio_level, agg=agg, kl_coef=0.1, ent_coef=0.01, llds_coef=0.2, num_seqs=4, norm_len=7)
    n = int(mask.sum())
    full, _ = L.compute_loss(lp, old, adv, mask, ref_logp=ref, entropy=ent, num_tokens=n, **kw)
    g_lp, g_ent = torch.autograd.grad(full, (lp, ent))
    total = 0.0
    for rows, width in ((slice(0, 2), 7), (slice(2, 4), 4)):  # the second micro-batch is trimmed to width 4
        part, _ = L.compute_loss(_trim(lp[rows], width), _trim(old[rows], width), adv[rows],
                                 _trim(mask[rows], width), ref_logp=_trim(ref[rows], width),
                                 entropy=_trim(ent[rows], width), num_tokens=n, **kw)
        total = total + part
    m_lp, m_ent = torch.autograd.grad(total, (lp, ent))
    assert close(total, full, 1e-12) and close(m_lp, g_lp, 1e-12) and close(m_ent, g_ent, 1e-12)
    assert full.abs().item() > 1e-3  # not a trivially zero case


@pytest.mark.parametrize("gate", ["action", "response"])
def test_llds_micro_batches_sum_to_one_piece(gate):
    lp, old, adv, mask = _random_case(7)
    old = old + 0.3  # most tokens lost likelihood, so gates open
    n = int(mask.sum())
    full, mf = llds_loss(lp, old, adv, mask, gate=gate, num_tokens=n)
    (g_full,) = torch.autograd.grad(full, lp)
    parts = [llds_loss(lp[r], old[r], adv[r], mask[r], gate=gate, num_tokens=n) for r in (slice(0, 2), slice(2, 4))]
    (g_parts,) = torch.autograd.grad(parts[0][0] + parts[1][0], lp)
    assert close(parts[0][0] + parts[1][0], full, 1e-12) and close(g_parts, g_full, 1e-12)
    assert full.item() > 1e-3 and mf["llds/gated_actions"] > 0
    for k in ("llds/preserving_tokens", "llds/actions", "llds/gated_actions", "llds/penalty"):  # counts add up
        assert close(parts[0][1][k] + parts[1][1][k], mf[k], 1e-12)
