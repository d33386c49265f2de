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


# ------------------------------------------------------------------------ the authors' inverted mask ("authors")
def inverted_mask_reference(att: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """The authors' computation spelled out, from DESIGN.md section 3: per block, q·k + position logits over the
    whole zero-padded (block + 2·halo)² window, then the logits of keys INSIDE the image replaced by the most
    negative float (the inverted mask), softmax, weighted sum of v (zero at padded keys)."""
    n, c, h, w = x.shape
    b, hl, heads, dh, span = att.block, att.halo, att.heads, att.dim_head, att.span
    xp = torch.nn.functional.pad(x, (hl, hl, hl, hl))  # padded keys: k = v = 0 (bias-free projection)
    xl, xpl = x.permute(0, 2, 3, 1), xp.permute(0, 2, 3, 1)
    q = att.to_q(xl).reshape(n, h, w, heads, dh) * att.scale
    k, v = att.to_kv(xpl).chunk(2, dim=-1)
    k, v = k.reshape(n, h + 2 * hl, w + 2 * hl, heads, dh), v.reshape(n, h + 2 * hl, w + 2 * hl, heads, dh)
    inside = torch.nn.functional.pad(torch.ones(h, w, dtype=torch.bool), (hl, hl, hl, hl))
    off = b + hl - 1
    out = torch.zeros(n, h, w, heads, dh, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            y0, x0 = (i // b) * b, (j // b) * b  # window rows y0-hl .. y0+b+hl-1 = padded rows y0 .. y0+span-1
            kk = k[:, y0 : y0 + span, x0 : x0 + span].reshape(n, span * span, heads, dh)
            vv = v[:, y0 : y0 + span, x0 : x0 + span].reshape(n, span * span, heads, dh)
            ky, kx = torch.meshgrid(torch.arange(span), torch.arange(span), indexing="ij")
            ky, kx = ky.reshape(-1) + y0 - hl, kx.reshape(-1) + x0 - hl  # image coordinates of the keys
            pos = att.rel_height[ky - i + off] + att.rel_width[kx - j + off]
            logits = torch.einsum("nhd,nkhd->nhk", q[:, i, j], kk + pos[None, :, None, :])
            in_image = inside[y0 : y0 + span, x0 : x0 + span].reshape(-1)
            logits = logits.masked_fill(in_image[None, None, :], -torch.finfo(logits.dtype).max)
            out[:, i, j] = torch.einsum("nhk,nkhd->nhd", logits.softmax(dim=-1), vv)
    return att.to_out(out.reshape(n, h, w, heads * dh)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("block,halo,h,w", [(4, 1, 12, 16), (6, 2, 18, 24), (4, 0, 8, 8)])
def test_authors_mask_equals_the_inverted_mask_computation(block, halo, h, w):
    torch.manual_seed(4)
    att = HaloAttention(8, 2, dim_head=4, block=block, halo=halo, mask="authors").double()
    x = torch.randn(2, 8, h, w, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(att(x), inverted_mask_reference(att, x), rtol=1e-10, atol=1e-10)


def test_authors_mask_is_windowed_average_pooling_of_v():
    """What the inverted mask amounts to: blocks whose window lies inside the image output the mean of v over
    the window; blocks whose window leaves the image output the out-projection's bias alone."""
    torch.manual_seed(5)
    block, halo, h = 12, 2, 60
    att = HaloAttention(6, 2, dim_head=4, block=block, halo=halo, mask="authors").double()
    x = torch.randn(1, 6, h, h, dtype=torch.double)
    with torch.no_grad():
        out = att(x)
        v = att.to_kv(x.permute(0, 2, 3, 1))[..., 8:]  # (1, H, W, inner)
    bias = att.to_out.bias
    for by in range(h // block):
        for bx in range(h // block):
            y0, x0 = by * block, bx * block
            got = out[0, :, y0 : y0 + block, x0 : x0 + block]
            if 0 < by < 4 and 0 < bx < 4:  # interior: the 16x16 window is inside the 60x60 map
                mean_v = v[0, y0 - halo : y0 + block + halo, x0 - halo : x0 + block + halo].mean(dim=(0, 1))
                want = att.to_out(mean_v)
            else:
                want = bias
            torch.testing.assert_close(got, want[:, None, None].expand_as(got))


def test_authors_mask_gives_q_k_and_positions_no_gradient():
    torch.manual_seed(6)
    att = HaloAttention(8, 2, dim_head=8, block=4, halo=1, mask="authors")
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    (att(x) * torch.randn(2, 8, 12, 12)).sum().backward()
    inner = att.heads * att.dim_head
    for grad in (att.to_q.weight.grad, att.rel_height.grad, att.rel_width.grad):
        assert grad is None or not grad.any()
    assert att.to_kv.weight.grad is not None
    assert not att.to_kv.weight.grad[:inner].any()  # k
    assert att.to_kv.weight.grad[inner:].abs().sum() > 0  # v
    assert att.to_out.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_default_attention_is_real_halo_attention():
    from wsi_haloae.config import ModelConfig
    from wsi_haloae.model.autoencoder import HaloAutoEncoder

    assert HaloAttention(4, 1).mask == "halo"
    for name in ("paper", "r31", "tiny"):
        assert ModelConfig.preset(name).attention == "halo"
    for name, base in (("paper-authors-mask", "paper"), ("r31-authors-mask", "r31")):
        cfg = ModelConfig.preset(name)
        assert cfg.attention == "authors-mask"
        # the variant differs from its base in the attention alone (and its name and description)
        strip = lambda d: {k: v for k, v in d.items() if k not in ("name", "description", "attention")}  # noqa: E731
        assert strip(cfg.to_dict()) == strip(ModelConfig.preset(base).to_dict())
    tiny = ModelConfig.preset("tiny")
    masks = {m.mask for m in HaloAutoEncoder(tiny).modules() if isinstance(m, HaloAttention)}
    assert masks == {"halo"}
    from dataclasses import replace

    masks = {m.mask for m in HaloAutoEncoder(replace(tiny, attention="authors-mask")).modules() if isinstance(m, HaloAttention)}
    assert masks == {"authors"}


def test_unknown_attention_mode_is_a_user_error():
    from dataclasses import replace

    from wsi_haloae.config import ModelConfig
    from wsi_haloae.errors import BadInputError
    from wsi_haloae.model.autoencoder import HaloAutoEncoder

    with pytest.raises(BadInputError, match="unknown attention 'inverted'"):
        HaloAutoEncoder(replace(ModelConfig.preset("tiny"), attention="inverted"))
    with pytest.raises(ValueError, match="mask"):
        HaloAttention(4, 1, mask="inverted")
