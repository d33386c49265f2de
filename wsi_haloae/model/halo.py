"""Blocked local self-attention with a halo (HaloNet, Vaswani et al. 2021), as used by HaloAE.

Each ``block``×``block`` group of queries attends to the (block + 2·halo)² window around it. Keys that fall
outside the image are excluded (−inf logit), never attended: the authors' code inverted that mask, which
turned attention into block average pooling and left q, k and the position tables without gradient.

Logits are content (q·k) plus learned relative-position terms (separate height and width tables, as in
HaloNet). Rather than materialising a (queries × keys) bias per block and head, the position terms and the
mask ride along as extra feature columns: q' = [q, q·r_h (per key row), q·r_w (per key column), 1] and
k' = [k, one-hot(key row), one-hot(key column), 0 or −1e9 outside the image], so q'·k' is exactly the full
logit and ``F.scaled_dot_product_attention`` can use its fused (flash) kernels on CPU and GPU alike.

``mask="authors"`` reproduces what the authors' inverted mask computes, so that their published model can be
re-run and compared (docs/model-card.md): in-image keys get the most negative logit, so a block whose window
reaches outside the image puts all its weight on the zero-padded keys (output: the out-projection's bias), and
a block whose window lies inside the image weighs its keys equally (output: the mean of v over the window).
That is average pooling of v with a (block + 2·halo)² window and stride ``block``, computed here directly; q, k
and the position tables take no part in it and get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


#: ``mask`` values: "halo" attends to the in-image keys of the window (HaloNet, the paper); "authors" is the
#: authors' code's inverted mask (see the module docstring).
MASKS = ("halo", "authors")


class HaloAttention(nn.Module):
    """Multi-head halo attention on (N, C, H, W); H and W must be multiples of ``block``. Output (N, C, H, W)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 16, block: int = 12, halo: int = 2, mask: str = "halo") -> None:
        super().__init__()
        if block < 1 or halo < 0 or heads < 1 or dim_head < 1:
            raise ValueError("HaloAttention: block, heads and dim_head must be >= 1 and halo >= 0")
        if mask not in MASKS:
            raise ValueError(f"HaloAttention: mask {mask!r} is not one of {MASKS}")
        self.dim, self.heads, self.dim_head, self.block, self.halo = dim, heads, dim_head, block, halo
        self.mask = mask
        self.span = block + 2 * halo
        inner = heads * dim_head
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # one row per relative offset (key - query) along that axis: -(block-1+halo) .. block-1+halo
        n_rel = 2 * (block + halo) - 1
        self.rel_height = nn.Parameter(torch.randn(n_rel, dim_head) * self.scale)
        self.rel_width = nn.Parameter(torch.randn(n_rel, dim_head) * self.scale)
        # rel_index[qy, ky] = ky - qy + block - 1 (key row ky counts from the top of the halo window)
        q_pos = torch.arange(block)[:, None]
        k_pos = torch.arange(self.span)[None, :]
        self.register_buffer("rel_index", (k_pos - q_pos + block - 1), persistent=False)
        self._key_cache: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, block={self.block}, halo={self.halo}, mask={self.mask}"

    def key_features(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(nb, span², 2·span + 1): one-hot key row, one-hot key column, and the mask column per window."""
        key = (h, w, device, dtype)
        kf = self._key_cache.get(key)
        if kf is None:
            span = self.span
            ones = torch.ones(1, 1, h, w, device=device)
            win = F.unfold(ones, kernel_size=span, stride=self.block, padding=self.halo)  # (1, span², nb)
            inside = win[0].transpose(0, 1) > 0.5  # (nb, span²)
            eye = torch.eye(span, device=device, dtype=dtype)
            rows = eye[:, None, :].expand(span, span, span).reshape(span * span, span)  # one-hot ky
            cols = eye[None, :, :].expand(span, span, span).reshape(span * span, span)  # one-hot kx
            neg = -3e4 if dtype == torch.float16 else -1e9  # exp() of it is exactly 0 next to any real logit
            mask = torch.zeros(inside.shape, device=device, dtype=dtype).masked_fill(~inside, neg)
            pos = torch.cat([rows, cols], dim=1)[None].expand(inside.shape[0], -1, -1)
            kf = torch.cat([pos, mask[..., None]], dim=2).contiguous()
            self._key_cache[key] = kf
        return kf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b, halo, span, heads, dh = self.block, self.halo, self.span, self.heads, self.dim_head
        if h % b or w % b:
            raise ValueError(f"HaloAttention: input {h}x{w} is not a multiple of block {b}")
        if self.mask == "authors":
            return self._authors_mask(x)
        nbh, nbw = h // b, w // b
        nb = nbh * nbw
        xl = x.permute(0, 2, 3, 1)  # (N, H, W, C): the projections are per pixel
        q = self.to_q(xl) * self.scale  # (N, H, W, heads*dh)
        kv = self.to_kv(xl)  # k and v once per pixel; the windows below are views
        # queries: (N, nbh, b, nbw, b, heads, dh) -> (N*nb, heads, b*b, dh)
        q = q.reshape(n, nbh, b, nbw, b, heads, dh).permute(0, 1, 3, 5, 2, 4, 6).reshape(n * nb, heads, b * b, dh)
        # keys/values: zero-pad the halo (masked out below), slide span×span windows with stride block
        kv = F.pad(kv, (0, 0, halo, halo, halo, halo))
        kv = kv.unfold(1, span, b).unfold(2, span, b)  # (N, nbh, nbw, 2*heads*dh, span, span): a view
        kv = kv.reshape(n, nbh, nbw, 2, heads, dh, span * span).permute(3, 0, 1, 2, 4, 6, 5)  # view
        # position logits per query and key row / key column, gathered from the 1-D tables
        idx = self.rel_index  # (b, span): [query pos, key pos] -> table row
        lh = (q @ self.rel_height.to(q.dtype).t()).reshape(n * nb, heads, b, b, -1)  # (B, heads, qy, qx, n_rel)
        lw = (q @ self.rel_width.to(q.dtype).t()).reshape(n * nb, heads, b, b, -1)
        lh = lh.gather(-1, idx[None, None, :, None, :].expand(n * nb, heads, b, b, span))  # [..., qy, qx, ky]
        lw = lw.gather(-1, idx[None, None, None, :, :].expand(n * nb, heads, b, b, span))  # [..., qy, qx, kx]
        # augmented q', k' (and v padded alike: fused kernels need one head size, a multiple of 8)
        d0 = dh + 2 * span + 1
        d = d0 + (-d0) % 8
        nq, nk = b * b, span * span
        qa = q.new_zeros(n * nb, heads, nq, d)
        qa[..., :dh] = q
        qa[..., dh : dh + span] = lh.reshape(n * nb, heads, nq, span)
        qa[..., dh + span : dh + 2 * span] = lw.reshape(n * nb, heads, nq, span)
        qa[..., d0 - 1] = 1.0
        ka = q.new_zeros(n, nbh, nbw, heads, nk, d)
        ka[..., :dh] = kv[0]
        kf = self.key_features(h, w, x.device, q.dtype)  # (nb, span², 2*span+1)
        ka[..., dh:d0] = kf.reshape(1, nbh, nbw, 1, nk, d0 - dh)
        va = q.new_zeros(n, nbh, nbw, heads, nk, d)
        va[..., :dh] = kv[1]
        out = F.scaled_dot_product_attention(qa, ka.reshape(n * nb, heads, nk, d), va.reshape(n * nb, heads, nk, d), scale=1.0)
        out = out[..., :dh]
        # (N*nb, heads, b*b, dh) -> (N, H, W, heads*dh)
        out = out.reshape(n, nbh, nbw, heads, b, b, dh).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, h, w, heads * dh)
        return self.to_out(out).permute(0, 3, 1, 2)

    def _authors_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The authors' inverted mask, computed directly: per block, the mean of v over its window if the window
        lies inside the image, else zero; then the output projection."""
        n, c, h, w = x.shape
        b, halo, inner = self.block, self.halo, self.heads * self.dim_head
        v = F.linear(x.permute(0, 2, 3, 1), self.to_kv.weight[inner:]).permute(0, 3, 1, 2)  # (N, inner, H, W)
        pooled = F.avg_pool2d(v, self.span, stride=b, padding=halo, count_include_pad=True)  # (N, inner, nbh, nbw)
        starts_y = torch.arange(0, h, b, device=x.device)
        starts_x = torch.arange(0, w, b, device=x.device)
        inside_y = (starts_y - halo >= 0) & (starts_y + b + halo <= h)
        inside_x = (starts_x - halo >= 0) & (starts_x + b + halo <= w)
        pooled = pooled * (inside_y[:, None] & inside_x[None, :]).to(pooled.dtype)
        out = pooled.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)  # (N, inner, H, W)
        return self.to_out(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
