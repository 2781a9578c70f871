"""One dispatch namespace for every op: GPU kernel on CUDA tensors, CPU implementation otherwise.

Force a backend with DAR_FAST_BACKEND=torch|triton|auto, or per op with
DAR_FAST_BACKEND_<OP> (see dar_fast.kernels.backend).

    vq_nearest(z, codebook)                        fused l2-normalised nearest code (Triton)
    apply_rope(q, k, pos)                          2D / 1D / identity RoPE over q and k in one pass (Triton)
    flow_step(x, v, v_prev, t, t_next)             Euler / Adams-Bashforth update (Triton)
    flow_preview(x, v, v_prev, t)                  the same update to t = 1 (Triton; image / uint8 output fused)
    sample_tokens(logits, uncond, cfg, ...)        CFG + temperature + top-k/top-p + keyed Philox draw (C++/CUDA)
    images_to_uint8(img)                           (B,3,H,W) in [-1,1] -> (B,H,W,3) uint8, the released clamp(127.5x+128) truncation
    decode_attention(q, k_cache, v_cache, len)    one query per row over the used KV prefix, split-K, GQA (Triton)
    sample_noise(seeds, ids, shape, device)        keyed Gaussian noise, the same bits on CPU and GPU (Triton)
    rms_norm(x, weight, eps, residual=None)        RMSNorm, optionally fused with the residual add -> (y, x + r) (Triton)
    adaln_modulate(x, shift, scale)                DiT LayerNorm + (1 + scale) * x + shift in one pass (Triton)
    gated_residual(x, gate, y, shift, scale)       x + gate * y, optionally fused with the next adaln_modulate (Triton)
    swiglu(x13)                                    silu(a) * b over the halves of a merged [w1; w3] output (Triton)
"""
from dar_fast.kernels.adaln import adaln_modulate, gated_residual  # noqa: F401
from dar_fast.kernels.decode_attention import decode_attention  # noqa: F401
from dar_fast.kernels.flow_step import flow_preview, flow_step  # noqa: F401
from dar_fast.kernels.flow_step import images_to_uint8_ref as images_to_uint8  # noqa: F401
from dar_fast.kernels.rms_norm import rms_norm  # noqa: F401
from dar_fast.kernels.rope import apply_rope, grid_positions  # noqa: F401
from dar_fast.kernels.sample_tokens import sample_tokens  # noqa: F401
from dar_fast.kernels.swiglu import swiglu  # noqa: F401
from dar_fast.kernels.vq_nearest import vq_nearest  # noqa: F401
from dar_fast.seeding import sample_noise  # noqa: F401
