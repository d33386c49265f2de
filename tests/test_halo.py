"""Halo attention: equal to a naive per-query reference, exact receptive field, gradients where they belong."""

from __future__ import annotations

import pytest
import torch

from wsi_haloae.model.halo import HaloAttention


def naive_halo_attention(att: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """Per query: softmax over the in-image keys of its block+halo window of q·k + q·(r_h[dy] + r_w[dx])."""
    n, c, h, w = x.shape
    b, hl, heads, dh = att.block, att.halo, att.heads, att.dim_head
    xl = x.permute(0, 2, 3, 1)
    q = att.to_q(xl).reshape(n, h, w, heads, dh) * att.scale
    k, v = att.to_kv(xl).chunk(2, dim=-1)
    k = k.reshape(n, h, w, heads, dh)
    v = v.reshape(n, h, w, heads, dh)
    out = torch.zeros(n, h, w, heads, dh, dtype=x.dtype)
    off = b + hl - 1  # table row of displacement 0
    for i in range(h):
        for j in range(w):
            y0, x0 = (i // b) * b, (j // b) * b
            ys = torch.tensor([y for y in range(y0 - hl, y0 + b + hl) if 0 <= y < h])
            xs = torch.tensor([xx for xx in range(x0 - hl, x0 + b + hl) if 0 <= xx < w])
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            yy, xx = yy.reshape(-1), xx.reshape(-1)
            kk = k[:, yy, xx]  # (n, K, heads, dh)
            pos = att.rel_height[yy - i + off] + att.rel_width[xx - j + off]  # (K, dh)
            logits = torch.einsum("nhd,nkhd->nhk", q[:, i, j], kk + pos[None, :, None, :])
            a = logits.softmax(dim=-1)
            out[:, i, j] = torch.einsum("nhk,nkhd->nhd", a, v[:, yy, xx])
    return att.to_out(out.reshape(n, h, w, heads * dh)).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "dim,heads,dim_head,block,halo,h,w",
    [(8, 2, 4, 4, 1, 8, 12), (6, 3, 4, 4, 2, 12, 8), (16, 2, 16, 12, 2, 24, 24), (8, 1, 8, 4, 0, 8, 8)],
)
def test_equals_naive_reference(dim, heads, dim_head, block, halo, h, w):
    torch.manual_seed(0)
    att = HaloAttention(dim, heads, dim_head=dim_head, block=block, halo=halo).double()
    x = torch.randn(2, dim, h, w, dtype=torch.double)
    with torch.no_grad():
        got = att(x)
        want = naive_halo_attention(att, x)
    assert got.shape == (2, dim, h, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_close_to_reference():
    torch.manual_seed(1)
    att = HaloAttention(16, 4, dim_head=16, block=12, halo=2)
    x = torch.randn(1, 16, 12, 24)
    with torch.no_grad():
        want = naive_halo_attention(att.double(), x.double()).float()
        got = att.float()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos", [(0, 0), (5, 6), (11, 12), (12, 23), (17, 35), (23, 24)])
def test_receptive_field_is_exactly_block_plus_halo(pos):
    """Perturbing one pixel changes exactly the queries whose block+halo window holds it (keys outside the image
    are never attended, so border blocks see only their in-image window)."""
    block, halo, h, w = 12, 2, 24, 36
    torch.manual_seed(2)
    att = HaloAttention(8, 2, dim_head=8, block=block, halo=halo).double()
    x = torch.randn(1, 8, h, w, dtype=torch.double)
    x2 = x.clone()
    x2[0, :, pos[0], pos[1]] += 3.0
    with torch.no_grad():
        changed = (att(x2) - att(x)).abs().amax(dim=1)[0] > 1e-12
    expected = torch.zeros(h, w, dtype=torch.bool)
    for by in range(0, h, block):
        for bx in range(0, w, block):
            if by - halo <= pos[0] < by + block + halo and bx - halo <= pos[1] < bx + block + halo:
                expected[by : by + block, bx : bx + block] = True
    assert torch.equal(changed, expected)


def test_out_of_image_keys_are_not_attended():
    """A corner query attends only to in-image keys: with q = 0 and no position terms, attention is the plain mean
    of the values of its in-image window (an inverted mask would average something else, or nothing)."""
    att = HaloAttention(4, 1, dim_head=4, block=4, halo=2).double()
    with torch.no_grad():
        att.to_q.weight.zero_()
        att.rel_height.zero_()
        att.rel_width.zero_()
        att.to_out.weight.copy_(torch.eye(4))
        att.to_out.bias.zero_()
        att.to_kv.weight.copy_(torch.cat([torch.eye(4), torch.eye(4)]))  # k = v = x
    x = torch.randn(1, 4, 8, 8, dtype=torch.double)
    out = att(x)
    # block (0, 0): window rows/cols -2..5 clipped to 0..5
    torch.testing.assert_close(out[0, :, 0, 0], x[0, :, :6, :6].mean(dim=(1, 2)))
    # block (1, 1): window 2..9 clipped to 2..7
    torch.testing.assert_close(out[0, :, 7, 7], x[0, :, 2:, 2:].mean(dim=(1, 2)))


def test_q_k_and_position_parameters_get_gradients():
    torch.manual_seed(3)
    att = HaloAttention(8, 2, dim_head=8, block=4, halo=1)
    x = torch.randn(2, 8, 12, 12)
    (att(x) * torch.randn(2, 8, 12, 12)).sum().backward()
    inner = att.heads * att.dim_head
    assert att.to_q.weight.grad.abs().sum() > 0
    assert att.to_kv.weight.grad[:inner].abs().sum() > 0  # k
    assert att.to_kv.weight.grad[inner:].abs().sum() > 0  # v
    # every relative offset occurs in some interior block, so every table row must learn
    assert (att.rel_height.grad.abs().sum(dim=1) > 0).all()
    assert (att.rel_width.grad.abs().sum(dim=1) > 0).all()
    assert x.grad is None


def test_rejects_sizes_not_multiple_of_block():
    att = HaloAttention(4, 1, dim_head=4, block=12, halo=2)
    with pytest.raises(ValueError, match="multiple of block"):
        att(torch.randn(1, 4, 20, 24))
