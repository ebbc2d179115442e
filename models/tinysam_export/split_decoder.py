"""The mask decoder split into a per-frame graph and a per-prompt graph, with the same outputs.

SAM's two-way transformer spends most of a prompt's work on the 4096 image tokens. Part of that
work does not depend on the prompt at all, and much of the rest can be reordered so that the
image-side products have the width of the few prompt tokens (H heads x T tokens, 56 for a point
prompt) instead of the model width:

* **Per frame** (`FrameGraph`, once per embedding and mask input): the image tokens
  `keys = embedding + dense`, and the first block's image-side projections (the token->image
  keys and values, the image->token queries), which only see `keys` and the positional encoding.
* **Per prompt** (`PromptGraph`, then `MasksGraph`: the transformer and IoU head first, the
  mask upscaling second, so a caller that filters on predicted IoU, as segment-everything does,
  upscales only the prompts that pass):
  - token->image attention: `q . (Wk x + bk) = (Wk^T q) . x + q . bk`; the second term is constant
    along the softmax axis and drops out. Values: `sum_i a_i (Wv x_i + bv) = Wv (sum_i a_i x_i) + bv`
    because each softmax row sums to one. Both products are (H*T) x D x P instead of P x D x D/2.
  - image->token attention: the queries `Wq x + bq` are only ever dotted with the T token keys,
    so `x . (Wq^T k) + bq . k`; the output projection is applied to the T token values of each
    head first (`out = sum_h A_h (V_h Wo_h)`), a P x (H*T) x D product instead of P x D/2 x D.

The reordering is exact algebra; in float32 the outputs agree with the one-graph decoder to
rounding (the export checks 1e-4, scaled).
"""

from __future__ import annotations

import torch
from torch import nn

from .sam import Sam, SamAttention

FRAME_INPUTS = ["image_embeddings", "mask_input", "has_mask_input"]
FRAME_OUTPUTS = ["image_tokens", "t2i_keys", "t2i_values", "i2t_queries"]
PROMPT_INPUTS = FRAME_OUTPUTS + ["point_coords", "point_labels"]
PROMPT_OUTPUTS = ["prompt_image_tokens", "mask_weights", "iou_predictions"]
MASKS_INPUTS = ["prompt_image_tokens", "mask_weights"]
MASKS_OUTPUTS = ["masks"]


def _head_weights(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection D -> H*c as its per-head weight (H, c, D) and bias (H, c)."""
    out, d = linear.weight.shape
    return linear.weight.reshape(heads, out // heads, d), linear.bias.reshape(heads, out // heads)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*c) -> (B, H, N, c)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _image_side_projections(attn: SamAttention, keys: torch.Tensor, keys_pe: torch.Tensor):
    """The first block's projections of the image tokens, scaled for the dot product."""
    h = attn.num_heads
    scale = (attn.internal_dim // h) ** -0.5
    return (
        _split_heads(attn.k_proj(keys_pe), h) * scale,
        _split_heads(attn.v_proj(keys), h),
    )


class FrameGraph(nn.Module):
    """(1, D, e, e) embedding + optional mask -> the prompt-independent decoder tensors.

    Outputs: image_tokens (1, P, D); t2i_keys, t2i_values (1, H, P, c) of the first block's
    token->image attention; i2t_queries (1, H, P, c) of its image->token attention (keys and
    queries pre-multiplied by c^-1/2).
    """

    def __init__(self, model: Sam):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.block = model.mask_decoder.transformer.layers[0]
        e = model.cfg.embedding_size
        pe = model.prompt_encoder.pe_layer.dense(e).unsqueeze(0)
        self.register_buffer("key_pe", pe.flatten(2).permute(0, 2, 1).contiguous())

    def forward(self, image_embeddings, mask_input, has_mask_input):
        dense = self.prompt_encoder.embed_mask(mask_input, has_mask_input)
        keys = (image_embeddings + dense).flatten(2).permute(0, 2, 1)
        keys_pe = keys + self.key_pe
        t2i_keys, t2i_values = _image_side_projections(self.block.cross_attn_token_to_image, keys, keys_pe)
        i2t = self.block.cross_attn_image_to_token
        i2t_queries = _split_heads(i2t.q_proj(keys_pe), i2t.num_heads) * (i2t.internal_dim // i2t.num_heads) ** -0.5
        return keys, t2i_keys, t2i_values, i2t_queries


def _token_to_image(attn: SamAttention, q_in, keys, keys_pe):
    """Token->image attention of B prompts against their own image tokens (B, P, D)."""
    h = attn.num_heads
    b, t, _ = q_in.shape
    wk, _ = _head_weights(attn.k_proj, h)
    wv, bv = _head_weights(attn.v_proj, h)
    scale = (attn.internal_dim // h) ** -0.5
    q = _split_heads(attn.q_proj(q_in), h) * scale  # (B, H, T, c)
    qk = torch.einsum("bhtc,hcd->bhtd", q, wk).reshape(b, h * t, -1)  # (B, H*T, D)
    weights = (qk @ keys_pe.transpose(1, 2)).softmax(dim=-1)  # (B, H*T, P)
    mixed = (weights @ keys).reshape(b, h, t, -1)  # (B, H, T, D)
    v = torch.einsum("bhtd,hcd->bhtc", mixed, wv) + bv.unsqueeze(1)  # (B, H, T, c)
    return attn.out_proj(v.transpose(1, 2).reshape(b, t, -1))


def _image_to_token_output(attn: SamAttention, weights, values):
    """sum_h A_h (V_h Wo_h) + bo for weights (B, H, T, P) and token values (B, H, T, c).

    The weights keep the image tokens on the last (contiguous) axis, so the softmax over the T
    tokens before this runs across long rows (tract's softmax and reductions are slow on
    millions of rows of ~7 values), and the product takes them transposed.
    """
    b, h, t, p = weights.shape
    d = attn.out_proj.weight.shape[0]
    wo = attn.out_proj.weight.reshape(d, h, -1)  # (D, H, c)
    projected = torch.einsum("bhtc,dhc->bhtd", values, wo).reshape(b, h * t, d)
    return weights.reshape(b, h * t, p).transpose(1, 2) @ projected + attn.out_proj.bias


def _image_to_token(attn: SamAttention, keys_pe, tokens_pe, tokens):
    """Image->token attention: every image token (B, P, D) attends to the B prompts' tokens."""
    h = attn.num_heads
    b, t, _ = tokens.shape
    wq, bq = _head_weights(attn.q_proj, h)
    scale = (attn.internal_dim // h) ** -0.5
    k = _split_heads(attn.k_proj(tokens_pe), h) * scale  # (B, H, T, c)
    v = _split_heads(attn.v_proj(tokens), h)
    kq = torch.einsum("bhtc,hcd->bhtd", k, wq).reshape(b, h * t, -1)  # (B, H*T, D)
    kb = torch.einsum("bhtc,hc->bht", k, bq).reshape(b, h * t, 1)
    scores = kq @ keys_pe.transpose(1, 2) + kb  # (B, H*T, P)
    weights = scores.reshape(b, h, t, -1).softmax(dim=2)
    return _image_to_token_output(attn, weights, v)


def _transposed_conv_matrix(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2x2, stride-2 transposed convolution as a (Cin, 2*2*Cout) matrix: the patches do not
    overlap, so each input pixel's output patch (dy, dx, c) is one matrix-vector product."""
    cin, cout, kh, kw = conv.weight.shape
    return conv.weight.permute(0, 2, 3, 1).reshape(cin, kh * kw * cout)


def _layer_norm_last(norm, x: torch.Tensor) -> torch.Tensor:
    """SAM's LayerNorm2d over the last (channel) axis, same formula and eps."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return norm.weight * ((x - u) / torch.sqrt(s + norm.eps)) + norm.bias


def _upscaled_masks(upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor, e: int) -> torch.Tensor:
    """SAM's output upscaling and hypernetwork product, channels last.

    keys (B, e*e, D) image tokens; hyper (B, K, C) mask weights -> masks (B, K, 4e, 4e). The two
    transposed convolutions become matrix products on the channel axis, the LayerNorm a
    reduction over the contiguous axis, and the pixel shuffle of both 2x upsamplings is applied
    to the K mask planes at the end instead of to the C-channel feature maps.
    """
    conv1, norm, act1, conv2, act2 = upscaling
    b = keys.shape[0]
    c1 = conv1.weight.shape[1]
    c2 = conv2.weight.shape[1]
    x = keys @ _transposed_conv_matrix(conv1)  # (B, e*e, 2*2*C1): (dy, dx, c)
    x = x.reshape(b, e * e * 4, c1) + conv1.bias
    x = act1(_layer_norm_last(norm, x))
    x = x @ _transposed_conv_matrix(conv2)  # (B, e*e*4, 2*2*C2): (dy2, dx2, c)
    x = act2(x.reshape(b, e * e * 16, c2) + conv2.bias)
    masks = x @ hyper.transpose(1, 2)  # (B, pixels in (i, j, dy, dx, dy2, dx2) order, K)
    k = hyper.shape[1]
    masks = masks.reshape(b, e, e, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(b, k, 4 * e, 4 * e)


class PromptGraph(nn.Module):
    """B prompts of N points against the per-frame tensors -> their image tokens after the
    transformer (B, P, D), mask weights (B, 3, C) and IoU predictions (B, 3)."""

    def __init__(self, model: Sam):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.decoder = model.mask_decoder
        self.e = model.cfg.embedding_size
        pe = model.prompt_encoder.pe_layer.dense(self.e).unsqueeze(0)
        self.register_buffer("key_pe", pe.flatten(2).permute(0, 2, 1).contiguous())

    def forward(self, image_tokens, t2i_keys, t2i_values, i2t_queries, point_coords, point_labels):
        dec = self.decoder
        tr = dec.transformer
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
        b = sparse.shape[0]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        point_pe = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # (B, T, D)

        # Block 0: the image side is the per-frame input (it has not seen the prompt yet).
        first = tr.layers[0]
        queries = first.norm1(first.self_attn(point_pe, point_pe, point_pe))
        a = first.cross_attn_token_to_image
        q = _split_heads(a.q_proj(queries + point_pe), a.num_heads)
        weights = (q @ t2i_keys.transpose(2, 3)).softmax(dim=-1)  # (B, H, T, P)
        mixed = (weights @ t2i_values).transpose(1, 2).reshape(b, queries.shape[1], -1)
        queries = first.norm2(queries + a.out_proj(mixed))
        queries = first.norm3(queries + first.mlp(queries))
        a = first.cross_attn_image_to_token
        k = _split_heads(a.k_proj(queries + point_pe), a.num_heads)  # (B, H, T, c)
        v = _split_heads(a.v_proj(queries), a.num_heads)
        weights = (k @ i2t_queries.transpose(2, 3)).softmax(dim=2)  # (B, H, T, P)
        keys = first.norm4(image_tokens + _image_to_token_output(a, weights, v))

        for block in tr.layers[1:]:
            q = queries + point_pe
            queries = block.norm1(queries + block.self_attn(q, q, queries))
            keys_pe = keys + self.key_pe
            queries = block.norm2(queries + _token_to_image(block.cross_attn_token_to_image, queries + point_pe, keys, keys_pe))
            queries = block.norm3(queries + block.mlp(queries))
            keys = block.norm4(keys + _image_to_token(block.cross_attn_image_to_token, keys_pe, queries + point_pe, queries))

        # The final attention only for the tokens read after it: the IoU token and the mask
        # tokens of the multimask outputs (1..); the point tokens' rows and mask token 0's would
        # be computed and dropped (attention rows, the projection, the residual and the
        # LayerNorm are each per token, so this is exact).
        keys_pe = keys + self.key_pe
        n = 1 + dec.num_mask_tokens

        def read(t):  # the IoU token and mask tokens 1.. of (B, T, D)
            return torch.cat([t[:, :1], t[:, 2:n]], dim=1)

        used = read(queries)
        used_pe = read(point_pe)
        used = tr.norm_final_attn(used + _token_to_image(tr.final_attn_token_to_image, used + used_pe, keys, keys_pe))

        iou_out = used[:, 0, :]
        mask_out = used[:, 1:, :]
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps[1:])], dim=1)
        iou = dec.iou_prediction_head(iou_out)
        return keys, hyper, iou[:, 1:]


class MasksGraph(nn.Module):
    """The prompts' image tokens (B, P, D) and mask weights (B, 3, C) -> masks (B, 3, 4e, 4e)."""

    def __init__(self, model: Sam):
        super().__init__()
        self.upscaling = model.mask_decoder.output_upscaling
        self.e = model.cfg.embedding_size

    def forward(self, prompt_image_tokens, mask_weights):
        return _upscaled_masks(self.upscaling, prompt_image_tokens, mask_weights, self.e)
