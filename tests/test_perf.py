"""dar_fast.perf: counts against hand arithmetic on a tiny config, the one device table, and the README floors."""
import pytest

from dar_fast import perf
from dar_fast.config import AR_PRESETS, TOKENIZER_PRESETS, ARConfig, DiffDecoderConfig, TokenizerConfig


def tiny_ar():
    # dim 8, 2 layers, 2 query heads of 4, 1 kv head; ffn int(2*4*8/3) = 21 -> 24 (multiple of 8)
    return ARConfig(dim=8, n_layer=2, n_head=2, n_kv_head=1, multiple_of=8, vocab_size=16, block_size=3,
                    num_classes=4).validate()


def tiny_tok():
    return TokenizerConfig(encoder_patch_size=4, num_encoder_layers=1, num_decoder_layers=1, encoder_dim=8,
                           decoder_dim=8, vq_dim=2, vq_codebook_size=16, num_denoising_steps=2, num_query_groups=2,
                           num_all_queries=4, queries_per_step=2, sampling_resolution=8, head_dim=4, repa_head=False,
                           diff_decoder=DiffDecoderConfig(dim=8, cond_dim=8, patch_size=4, depth=1,
                                                          repa_layer=99)).validate()


def test_ar_counts_by_hand():
    cfg = tiny_ar()
    assert cfg.ffn_hidden == 24
    # per layer: qkv 8 x (2 + 2 x 1) x 4 = 128, wo 8 x 8 = 64, SwiGLU 3 x 8 x 24 = 576; x 2 layers; head 8 x 16
    assert perf.ar_matmul_params(cfg) == 2 * (128 + 64 + 576) + 128 == 1664
    # + norms (2 per layer + final) x 8; 2 bytes each; tables not read
    assert perf.ar_weight_bytes(cfg) == (1664 + 5 * 8) * 2 == 3408
    assert perf.ar_params(cfg) == 1664 + 40 + 5 * 8 + 16 * 8
    # K and V, 2 layers, 1 kv head of 4, bf16
    assert perf.ar_kv_bytes_per_position(cfg) == 2 * 2 * 1 * 4 * 2 == 32


def test_ar_image_cost_by_hand():
    cfg = tiny_ar()
    c = perf.ar_image_cost(cfg, batch=1, guided=True, kv="prefix")          # 2 rows, 3 tokens
    mm_f, mm_b = c.parts["ar_matmul"]
    kv_f, kv_b = c.parts["ar_kv"]
    assert mm_f == 2 * 1664 * 2 * 3 == 19968
    # activations per row: 2 layers x 304 moves + embedding 8 + final norm 8 + logits 2 x 16, x 2 B; 2 rows
    assert perf._ar_act_moves(cfg) == 304
    assert mm_b == 3 * (3408 + 2 * (2 * 304 + 8 + 8 + 32) * 2) == 18096
    # token j attends to j + 1 positions: 1 + 2 + 3 = 6; 4 x layers x heads x hd x positions x rows
    assert kv_f == 4 * 2 * 2 * 4 * 6 * 2 == 768
    # read j + 1 positions and write 1, per row: (2 + 3 + 4) x 2 rows x 32 B
    assert kv_b == (2 + 3 + 4) * 2 * 32 == 576
    full = perf.ar_image_cost(cfg, batch=1, guided=True, kv="full")         # all N + 1 = 4 slots every step
    assert full.parts["ar_kv"][1] == 3 * 2 * (4 + 1) * 32 == 960
    assert full.parts["ar_kv"][0] == kv_f                                   # same FLOPs (masked work not counted)
    # batch 4: weights shared, per-image everything else unchanged
    c4 = perf.ar_image_cost(cfg, batch=4)
    assert c4.parts["ar_matmul"][1] == pytest.approx(3 * (3408 / 4 + 2 * 656 * 2))
    assert c4.parts["ar_kv"][1] == kv_b
    # roofline on a device of 1000 FLOP/s and 1000 B/s: matmul max(19.968, 18.096) s + KV max(0.768, 0.576) s
    dev = perf.Device("toy", bf16_tflops=1e-9, hbm_gbs=1e-6)
    assert c.roofline_ms(dev) == pytest.approx((19.968 + 0.768) * 1e3)
    assert c.bound_ms(dev) == pytest.approx(max(19968 + 768, 18096 + 576))
    with pytest.raises(ValueError, match="prefix"):
        perf.ar_image_cost(cfg, 1, kv="all")


def test_dit_and_tokenizer_by_hand():
    tok = tiny_tok()
    dd = tok.diff_decoder                                                   # D = 8, T = (8/4)^2 = 4, G = 2
    blk = (2 * 2 * 64 + 2 * 2 * 2 * 64 + 2 * 4 * 2 * 64 + 2 * 2 * 2 * 64 + 4 * 4 * 2 * 8 + 2 * 4 * 6 * 64
           + 2 * 4 * 4 * 64 + 4 * 16 * 8 + 2 * 4 * 8 * 64)
    assert blk == 12288 and perf.dit_block_flops(dd, 4, 2) == blk
    # patchify in / out 2 x T x 3 p^2 x D x 2, condition projection 2 x G x cond_dim x D
    assert perf.dit_call_flops(tok) == 2 * 4 * 48 * 8 * 2 + 2 * 2 * 8 * 8 + blk == 18688
    assert perf.tokenizer_decode_flops(tok) == 2 * 18688
    c = perf.tokenizer_cost(tok, batch=1)
    # decoder layers: 2 N (vq_dim Dd + 12 Dd^2) + 4 Dd N (N + 1) / 2, N = 4
    assert c.parts["tok_decoder"][0] == 2 * 4 * (16 + 768) + 4 * 8 * 10 == 6592
    total_dit = sum(c.parts[k][0] for k in ("dit_matmul", "dit_attention"))
    assert total_dit == 2 * 18688                                           # split, nothing lost
    assert c.parts["dit_attention"][0] == 2 * (4 * 16 * 8 + 4 * 4 * 2 * 8)
    # element-wise: 29 (T, C) passes x T x D x 2 B x depth, per step; flow step 4 fp32 passes over 3 x 8 x 8
    assert c.parts["dit_elementwise"][1] == 2 * 29 * 4 * 8 * 2
    assert c.parts["flow_step"][1] == 2 * 4 * 3 * 64 * 4
    assert perf.DIT_GEMM_MOVES + perf.DIT_ATTN_MOVES + perf.DIT_ELEM_MOVES == 62
    f = perf.tokenizer_forward_flops(tok)
    assert f["diffusion"] == 18688 and f["dit_blocks"] == blk
    assert perf.tokenizer_train_flops(tok, 3) == 3 * 3 * (f["encoder"] + f["decoder"] + f["diffusion"])


def test_one_device_table():
    assert perf.device("NVIDIA H200").hbm_gbs_measured == 4300.0
    assert perf.device("NVIDIA GH200 480GB").name == "GH200"                # not the H200 entry
    assert perf.device("NVIDIA H100 80GB HBM3").name.startswith("H100 SXM")
    assert perf.device("NVIDIA H100 PCIe").hbm_gbs == 2000.0
    assert perf.device("Intel Xeon") is None
    ceil = dict(perf.gpu_ceilings())
    assert ceil["H100"]["mem_bw_gbs_measured"] == 3000.0 and "GH200" not in ceil      # needs a bandwidth
    from dar_fast.training import distributed
    from dar_fast.training.ar_train import ar_train_flops
    from dar_fast.training.tokenizer_train import tokenizer_forward_flops
    assert ar_train_flops is perf.ar_train_flops and tokenizer_forward_flops is perf.tokenizer_forward_flops
    assert dict(distributed.PEAK_BF16_TFLOPS)["H200"] == perf.device("H200").bf16_tflops


def test_peak_override(monkeypatch):
    monkeypatch.setenv("DAR_FAST_PEAK_TFLOPS", "100")
    assert perf.peak_bf16_flops("anything") == 100e12
    monkeypatch.delenv("DAR_FAST_PEAK_TFLOPS")
    assert perf.peak_bf16_flops("NVIDIA H200") == 989e12


def test_dar_xl_floor_matches_the_derivation():
    """The figures of the module docstring (and the README) are what the model computes."""
    tok = TOKENIZER_PRESETS["tokenizer_v1"]().validate()
    ar = AR_PRESETS["D-AR-XL"]().validate()
    assert perf.ar_matmul_params(ar) == 36 * (3 * 1280 ** 2 + 1280 ** 2 + 3 * 1280 * 3584) + 1280 * 16384
    assert perf.ar_kv_bytes_per_position(ar) == 184320
    assert sum(range(1, 257)) == 32896
    h200 = perf.device("H200")
    s = perf.stage_floors(tok, ar, h200, 256)
    assert s["ar"]["parts"]["ar_kv"]["gb"] == pytest.approx(184320 * (32896 + 256) * 2 / 1e9)
    assert s["ar"]["roofline_ms"] == pytest.approx(3.82, abs=0.01)
    assert s["tokenizer"]["roofline_ms"] == pytest.approx(4.43, abs=0.01)
    assert perf.dit_call_flops(tok) / 1e9 == pytest.approx(332.25, abs=0.01)
    fl = perf.fid_floor(tok, ar, h200)
    assert fl["ms_per_image"] == pytest.approx(8.24, abs=0.01)
    assert fl["roofline_min"] == pytest.approx(6.87, abs=0.01) and fl["bound_min"] == pytest.approx(4.86, abs=0.01)
    full = perf.fid_floor(tok, ar, h200, kv="full")
    assert full["roofline_min"] == pytest.approx(9.22, abs=0.01)
    # batch 1, D-AR-L, H200: weights (0.65 GB-class) x 256 steps + KV prefix
    L = AR_PRESETS["D-AR-L"]().validate()
    b1 = perf.stage_floors(tok, L, h200, 1)["ar"]["roofline_ms"]
    assert 256 * perf.ar_weight_bytes(L) / 4.3e12 * 1e3 < b1 < 1.1 * 256 * perf.ar_weight_bytes(L) / 4.3e12 * 1e3


def test_compat_floors():
    tok = TOKENIZER_PRESETS["tokenizer_v1"]().validate()
    ar = AR_PRESETS["D-AR-L"]().validate()
    f = perf.floors(tok, ar, 4300.0, 790.0)
    assert f["ar_weight_read_floor_ms"] == pytest.approx(256 * perf.ar_weight_bytes(ar) / 4.3e12 * 1e3)
    assert f["ar_batch1_floor_ms"] > f["ar_weight_read_floor_ms"]
    assert f["image_tflop"] == pytest.approx(perf.image_flops(tok, ar) / 1e12)
    assert 0 < f["batch256_images_per_s"] < f["flop_floor_images_per_s"]
