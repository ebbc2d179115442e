"""Issue 18: the decoder's later token->image attentions in head space, checked on the real
architecture before any runtime work.

The split decoder's per-prompt image side (`models/tinysam_export/split_decoder.py`) still does
two full-width passes over the 4096 image tokens per prompt in its second block's and its final
token->image attention: logits `(x + pe) . (Wk^T q)` and weighted sums of `x` (256 wide), 56 and
32 query rows. But the image tokens there are low rank around the frame's own tokens `x0`: after
block 1, `x1 = r1 (g1 * (x0 + A1 R1 + o1 - mu1)) + b1` (`A1` the image->token softmax weights,
`R1` the prompt's 56 projected token values, `mu1`, `r1` the LayerNorm's mean and 1/sigma, `g1`,
`b1` its gamma and beta); after block 2, `x2 = r1 r2 (g1 g2 * x0) + c(p) . B + b2` with the same
116 coefficients per image token that the mask upscaling's low-rank form already uses. Every
projection after that is linear, so each attention can run on per-frame head-space tensors
(`x0` through `g * Wk^T`, `Wv^T`, `pe` through `Wk^T`: 128 wide, once per frame) plus products
of the width of the prompt's coefficients:

    logits(p) = r(p) [q . K0(p) + A(p) . (N q) + q . kb - mu(p) q . kg] + q . KP(p)
    sum_p w(p) v(p) = sum_p (w r)(p) V0(p) + (sum_p (w r)(p) A(p)) N_v + scalars

This script builds the full-size synthetic-weight model (the architecture of `models/default`),
runs the split decoder's per-prompt graph on a real photo's embedding, and recomputes both
attentions in that form; it prints the largest difference against the reference (float64 and
float32) and the multiply-adds per image token of each form. Run from the repository root:

    models/.venv/bin/python benches/decoder_head_space_study.py > benches/decoder-head-space-results.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))

from tinysam_export.config import FULL
from tinysam_export.images import CALIBRATION_PHOTOS, skimage_photos
from tinysam_export.preprocess import preprocess
from tinysam_export.split_decoder import FrameGraph, _split_heads
from tinysam_export.weights import synthetic_model


def reference(model, image_tokens, t2i_keys, t2i_values, i2t_queries, coords, labels, key_pe):
    """The per-prompt graph's block 1, block 2 and final attention, keeping what the study needs."""
    dec = model.mask_decoder
    tr = dec.transformer
    sparse = model.prompt_encoder.embed_points(coords, labels)
    b = sparse.shape[0]
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    point_pe = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    first = tr.layers[0]
    queries = first.norm1(first.self_attn(point_pe, point_pe, point_pe))
    a = first.cross_attn_token_to_image
    q = _split_heads(a.q_proj(queries + point_pe), a.num_heads)
    weights = (q @ t2i_keys.transpose(2, 3)).softmax(dim=-1)
    mixed = (weights @ t2i_values).transpose(1, 2).reshape(b, queries.shape[1], -1)
    queries = first.norm2(queries + a.out_proj(mixed))
    queries = first.norm3(queries + first.mlp(queries))
    a = first.cross_attn_image_to_token
    k = _split_heads(a.k_proj(queries + point_pe), a.num_heads)
    v = _split_heads(a.v_proj(queries), a.num_heads)
    w1 = (k @ i2t_queries.transpose(2, 3)).softmax(dim=2)  # (B, H, T, P)
    h, t = w1.shape[1], w1.shape[2]
    d = a.out_proj.weight.shape[0]
    wo = a.out_proj.weight.reshape(d, h, -1)
    r1_values = torch.einsum("bhtc,dhc->bhtd", v, wo).reshape(b, h * t, d)  # R1 (B, 56, D)
    a1 = w1.reshape(b, h * t, -1).transpose(1, 2)  # A1 (B, P, 56)
    y1 = image_tokens + a1 @ r1_values + a.out_proj.bias
    x1 = first.norm4(y1)
    saved = {"A1": a1, "R1": r1_values, "o1": a.out_proj.bias, "y1": y1, "norm1": first.norm4}

    block = tr.layers[1]
    q = queries + point_pe
    queries = block.norm1(queries + block.self_attn(q, q, queries))
    t2i = block.cross_attn_token_to_image
    saved["t2i_q_in"] = queries + point_pe
    saved["t2i_out"] = t2i(queries + point_pe, x1 + key_pe, x1)  # SAM's own attention
    queries = block.norm2(queries + saved["t2i_out"])
    queries = block.norm3(queries + block.mlp(queries))
    i2t = block.cross_attn_image_to_token
    qt = queries + point_pe
    k = i2t._heads(i2t.q_proj(x1 + key_pe))  # image tokens as queries
    kk = i2t._heads(i2t.k_proj(qt))
    vv = i2t._heads(i2t.v_proj(queries))
    w2 = (k @ kk.transpose(2, 3) / (k.shape[-1] ** 0.5)).softmax(dim=-1)  # (B, H, P, T)
    wo2 = i2t.out_proj.weight.reshape(d, h, -1)
    r2_values = torch.einsum("bhtc,dhc->bhtd", vv, wo2).reshape(b, h * t, d)
    a2 = w2.permute(0, 2, 1, 3).reshape(b, -1, h * t)  # A2 (B, P, 56)
    y2 = x1 + a2 @ r2_values + i2t.out_proj.bias
    x2 = block.norm4(y2)
    saved.update({"A2": a2, "R2": r2_values, "o2": i2t.out_proj.bias, "y2": y2, "norm2": block.norm4})
    n = 1 + dec.num_mask_tokens
    used = torch.cat([queries[:, :1], queries[:, 2:n]], dim=1)
    used_pe = torch.cat([point_pe[:, :1], point_pe[:, 2:n]], dim=1)
    final = tr.final_attn_token_to_image
    saved["final_q_in"] = used + used_pe
    saved["final_out"] = final(used + used_pe, x2 + key_pe, x2)
    return saved


def stats(y, norm):
    mu = y.mean(-1, keepdim=True)
    r = 1.0 / torch.sqrt((y - mu).pow(2).mean(-1, keepdim=True) + norm.eps)
    return mu, r


def attention_in_head_space(attn, q_in, low_rank, x0_scaled, key_const, key_pe):
    """SAM's attention(q_in, x + pe, x) for image tokens x = r * x0' + coeff . basis + key_const,
    `low_rank` = (r, coeff, basis), from per-frame head-space tensors: x0' Wk^T and x0' Wv^T (per
    frame), (key_const + pe) Wk^T + bk (a constant of the model); per prompt only the basis
    (n x D) goes through the projections."""
    scale_r, coeff, basis = low_rank
    frame_k = x0_scaled @ attn.k_proj.weight.T
    frame_v = x0_scaled @ attn.v_proj.weight.T
    key_pe_k = (key_const + key_pe) @ attn.k_proj.weight.T + attn.k_proj.bias
    h = attn.num_heads
    q = attn._heads(attn.q_proj(q_in))  # (B, H, T, c)
    c = q.shape[-1]
    nk = attn._heads(basis @ attn.k_proj.weight.T)  # (B, H, n, c)
    nv = attn._heads(basis @ attn.v_proj.weight.T)
    k0 = attn._heads(frame_k)
    kp = attn._heads(key_pe_k)
    v0 = attn._heads(frame_v)
    # logits (B, H, T, P) = r (q . K0) + A . (N q) + q . KP
    logits = scale_r.transpose(1, 2).unsqueeze(1) * (q @ k0.transpose(2, 3))
    logits = logits + (q @ nk.transpose(2, 3)) @ coeff.transpose(1, 2).unsqueeze(1)
    logits = (logits + q @ kp.transpose(2, 3)) / c**0.5
    w = logits.softmax(dim=-1)
    wr = w * scale_r.transpose(1, 2).unsqueeze(1)
    out = wr @ v0 + (w @ coeff.unsqueeze(1)) @ nv
    out = out + (key_const @ attn.v_proj.weight.T + attn.v_proj.bias).reshape(1, h, 1, c)
    b, _, t, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * c))


def main():
    torch.set_grad_enabled(False)
    model = synthetic_model(FULL, seed=0)
    photo = skimage_photos(CALIBRATION_PHOTOS[:1])[0]
    embedding = model.image_encoder(torch.from_numpy(preprocess(photo.rgb, FULL)))
    for dtype in (torch.float64, torch.float32):
        # (The dense positional encoding is built in float32, then cast with the rest.)
        frame = FrameGraph(model.float()).to(dtype)
        m = model.to(dtype)
        no_mask = torch.zeros(1, 1, 4 * FULL.embedding_size, 4 * FULL.embedding_size, dtype=dtype)
        image_tokens, t2i_keys, t2i_values, i2t_queries = frame(
            embedding.to(dtype), no_mask, torch.zeros(1, dtype=dtype)
        )
        key_pe = frame.key_pe
        coords = torch.tensor([[[300.0, 400.0], [0.0, 0.0]], [[700.0, 200.0], [0.0, 0.0]]], dtype=dtype)
        labels = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=dtype)
        s = reference(m, image_tokens, t2i_keys, t2i_values, i2t_queries, coords, labels, key_pe)
        mu1, r1 = stats(s["y1"], s["norm1"])
        mu2, r2 = stats(s["y2"], s["norm2"])
        g1, b1 = s["norm1"].weight, s["norm1"].bias
        g2, b2 = s["norm2"].weight, s["norm2"].bias

        # Block 2: x1 = r1 (g1 x0) + [r1 A1, r1, -r1 mu1] . [g1 R1; g1 o1; g1] + b1
        tr = m.mask_decoder.transformer
        att = tr.layers[1].cross_attn_token_to_image
        x0g = image_tokens * g1
        coeff = torch.cat([r1 * s["A1"], r1, -r1 * mu1], dim=-1)
        basis = torch.cat([g1 * s["R1"], (g1 * s["o1"]).expand(2, 1, -1), g1.expand(2, 1, -1)], dim=1)
        got = attention_in_head_space(att, s["t2i_q_in"], (r1, coeff, basis), x0g, b1, key_pe)
        diff_block2 = ((got - s["t2i_out"]).abs().max() / s["t2i_out"].abs().max()).item()

        # Final: x2 = r1 r2 (g1 g2 x0) + c . B + b2 (the upscaling's 116 coefficients)
        fin = tr.final_attn_token_to_image
        x0gg = image_tokens * g1 * g2
        rr = r1 * r2
        coeff2 = torch.cat([rr * s["A1"], r2 * s["A2"], rr, -rr * mu1, r2, -r2 * mu2], dim=-1)
        basis2 = torch.cat(
            [
                g1 * g2 * s["R1"],
                g2 * s["R2"],
                (g1 * g2 * s["o1"]).expand(2, 1, -1),
                (g1 * g2).expand(2, 1, -1),
                (g2 * (b1 + s["o2"])).expand(2, 1, -1),
                g2.expand(2, 1, -1),
            ],
            dim=1,
        )
        got = attention_in_head_space(fin, s["final_q_in"], (rr, coeff2, basis2), x0gg, b2, key_pe)
        diff_final = ((got - s["final_out"]).abs().max() / s["final_out"].abs().max()).item()
        print(
            f"- {str(dtype).removeprefix('torch.')}: block 2 token->image attention, largest difference / largest value: "
            f"{diff_block2:.2e}; final attention: {diff_final:.2e}"
        )

    p, d, c = image_tokens.shape[1], image_tokens.shape[2], 128
    h, t = 8, 7
    n1, n_all = h * t + 2, 2 * h * t + 4
    rows2, rows_final = h * t, 4 * h

    def per_head(rows):
        return rows * (c // h)

    now2 = 2 * rows2 * d
    new2 = 2 * (per_head(rows2) + n1 * rows2) + per_head(rows2)
    now_f = 2 * rows_final * d
    new_f = 2 * (per_head(rows_final) + n_all * rows_final) + per_head(rows_final)
    print()
    print(
        "| attention | query rows | multiply-adds per image token now | in head space | per prompt now -> then (MMAC) |"
    )
    print("|---|---:|---:|---:|---|")
    print(f"| block 2 token->image | {rows2} | {now2} | {new2} | {now2 * p / 1e6:.1f} -> {new2 * p / 1e6:.1f} |")
    print(f"| final token->image | {rows_final} | {now_f} | {new_f} | {now_f * p / 1e6:.1f} -> {new_f * p / 1e6:.1f} |")
    per_frame = 2 * 2 * p * d * c
    print()
    print(
        f"Per frame, once: x0 (times the LayerNorms' gamma, folded into the weights) through both attentions' key "
        f"and value projections, {per_frame / 1e6:.0f} MMAC; the positional encoding's keys `(b + pe) Wk^T + bk` "
        "are constants of the model. That is the saving of about five prompts: a frame with fewer prompts "
        "(one request) is better served by today's form, a batch or segment-everything by this one."
    )


if __name__ == "__main__":
    main()
