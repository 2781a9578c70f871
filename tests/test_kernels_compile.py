"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter (the CPU tests) runs the kernels as numpy code and never
lowers them, so a construct that fails to compile, or a lowering we rely on
(no approximate sin/cos or division), would only show on a GPU. triton.compile
targets sm_90 without a device (ptxas ships with triton): this catches it in
CPU CI.
"""
import os
import re

import pytest

from dar_fast.kernels.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(autouse=True)
def _pristine_triton_language():
    """An interpreted kernel run earlier in the session may have left triton.language patched (conftest)."""
    from conftest import restore_triton_language
    restore_triton_language()

DIV16 = [["tt.divisibility", 16]]


def compile_sm90(jitfn, types: dict, consts: dict, div16=(), num_warps=4, **options):
    """triton.compile for sm_90 -> (ptx, cubin); `types` gives every non-constexpr argument."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in jitfn.arg_names}
    attrs = {(jitfn.arg_names.index(n),): DIV16 for n in div16}
    try:
        k = triton.compile(ASTSource(fn=jitfn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, **options))
    except RuntimeError as e:  # no usable ptxas on this machine
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    return k.asm["ptx"], k.asm["cubin"]


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("d,dot,partial", [(8, False, True), (13, False, False), (64, True, True)])
def test_vq_nearest_compiles(d, dot, partial):
    from dar_fast.kernels import vq_nearest as vqm
    main, red = vqm._kernels(False)
    types = dict(z_ptr="*bf16", cbt_ptr="*fp32", idx_ptr="*i64", pval_ptr="*fp32", pidx_ptr="*i32", M="i32",
                 NP="i32", stride_zm="i32", stride_zd="i32", tiles_per_split="i32")
    bd = max(16 if dot else 1, 1 << (d - 1).bit_length())
    ptx, cubin = compile_sm90(main, types, dict(D=d, BLOCK_D=bd, BLOCK_M=64, BLOCK_N=64 if dot else 32, USE_DOT=dot,
                                                PARTIAL=partial), div16=("cbt_ptr", "NP"), num_warps=4 if dot else 2)
    assert cubin and "div.full" not in ptx and "sqrt.approx" not in ptx     # IEEE normalisation
    compile_sm90(red, dict(pval_ptr="*fp32", pidx_ptr="*i32", idx_ptr="*i64", M="i32", SPLIT="i32"),
                 dict(BLOCK_M=256))


@pytest.mark.parametrize("dtype,has_k,inverse", [("bf16", True, False), ("fp32", False, True)])
def test_rope_compiles(dtype, has_k, inverse):
    from dar_fast.kernels import rope as rm
    k = rm._kernel(False)
    types = {n: "i32" for n in k.arg_names}
    types.update(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", qo_ptr=f"*{dtype}", ko_ptr=f"*{dtype}", pos_ptr="*i32",
                 freq_ptr="*fp32")
    # stride(-1) == 1 is specialised to a constant at run time, as here
    ptx, cubin = compile_sm90(k, types, dict(HALF_D=32, HALF_SUB=16, BLOCK_P=32, BLOCK_H=16, HAS_K=has_k,
                                             INVERSE=inverse, PRECISE_TRIG=True, sqd=1, skd=1, sod=1, sgd=1),
                              div16=("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "sqb", "sqt", "sqh", "skb", "skt", "skh",
                                     "sob", "sot", "soh", "sgb", "sgt", "sgh"))
    assert cubin and "sin.approx" not in ptx and "cos.approx" not in ptx   # libdevice sin/cos
    assert re.search(r"ld\.global(\.nc)?\.v[24]", ptx)                      # rows read with vector loads


@pytest.mark.parametrize("mode,tptr,prev", [(0, False, True), (1, True, False), (2, True, True)])
def test_flow_step_compiles(mode, tptr, prev):
    from dar_fast.kernels import flow_step as fm
    k = fm._kernel(False)
    types = dict(x_ptr="*bf16", v_ptr="*bf16", vp_ptr="*bf16", out_ptr={0: "*bf16", 1: "*fp32", 2: "*u8"}[mode],
                 t_ptr="*fp32", tn_ptr="*fp32", ds_ptr="*fp32", dt_val="fp32", t_val="fp32", tn_val="fp32",
                 ds_val="fp32", t_bs="i32", tn_bs="i32", C="i32", S="i32")
    ptx, cubin = compile_sm90(k, types, dict(HAS_PREV=prev, T_PTR=tptr, TN_PTR=tptr, DT_HOST=not tptr, DS_PTR=tptr,
                                             PRECISE=True, MODE=mode, BLOCK_C=4 if mode == 2 else 1,
                                             BLOCK_S=256 if mode == 2 else 1024),
                              div16=("x_ptr", "v_ptr", "vp_ptr", "out_ptr", "S"))
    assert cubin and "div.full" not in ptx
    if mode == 2:   # the uint8 conversion: rounded multiply and add, never fused into an FMA
        # (ftz only flushes |x| < 1.2e-38, which gives 128 either way)
        assert re.search(r"mul\.rn(\.ftz)?\.f32", ptx) and re.search(r"add\.rn(\.ftz)?\.f32", ptx)
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.mark.parametrize("dtype,res", [("bf16", True), ("fp32", False)])
def test_rms_norm_compiles(dtype, res):
    from dar_fast.kernels import rms_norm as rn
    fwd, bwd = rn._kernels(False)
    ptx, cubin = compile_sm90(fwd, dict(x_ptr=f"*{dtype}", r_ptr=f"*{dtype}", w_ptr=f"*{dtype}", y_ptr=f"*{dtype}",
                                        h_ptr=f"*{dtype}", rstd_ptr="*fp32", C="i32", sx="i32", sr="i32", sy="i32",
                                        sh="i32", eps="fp32"),
                              dict(HAS_RES=res, BLOCK_C=1024),
                              div16=("x_ptr", "r_ptr", "w_ptr", "y_ptr", "h_ptr", "C", "sx", "sr", "sy", "sh"))
    assert cubin and "div.full" not in ptx and "rsqrt.approx" not in ptx and "sqrt.approx" not in ptx
    assert re.search(r"ld\.global(\.nc)?\.v[24]", ptx)                      # rows read with vector loads
    ptx, cubin = compile_sm90(bwd, dict(h_ptr=f"*{dtype}", gy_ptr=f"*{dtype}", gh_ptr=f"*{dtype}", w_ptr=f"*{dtype}",
                                        rstd_ptr="*fp32", dx_ptr=f"*{dtype}", dw_ptr="*fp32", M="i32", C="i32",
                                        rows_per_prog="i32"), dict(HAS_GH=res, BLOCK_C=1024),
                              div16=("h_ptr", "gy_ptr", "gh_ptr", "w_ptr", "dx_ptr", "dw_ptr", "C"))
    assert cubin and "div.full" not in ptx


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_swiglu_compiles(dtype):
    from dar_fast.kernels import swiglu as sm
    fwd, bwd = sm._kernels(False)
    ptx, cubin = compile_sm90(fwd, dict(x_ptr=f"*{dtype}", y_ptr=f"*{dtype}", H="i32", sx="i32", sy="i32"),
                              dict(BLOCK=1024), div16=("x_ptr", "y_ptr", "H", "sx", "sy"))
    assert cubin and "div.full" not in ptx
    assert re.search(r"ld\.global(\.nc)?\.v[24]", ptx)
    ptx, cubin = compile_sm90(bwd, dict(x_ptr=f"*{dtype}", g_ptr=f"*{dtype}", dx_ptr=f"*{dtype}", H="i32", sx="i32",
                                        sg="i32", sdx="i32"), dict(BLOCK=1024),
                              div16=("x_ptr", "g_ptr", "dx_ptr", "H", "sx", "sg", "sdx"))
    assert cubin and "div.full" not in ptx


@pytest.mark.parametrize("dtype,gated,norm,mod", [("bf16", True, True, True), ("bf16", False, True, True),
                                                  ("fp32", True, True, False), ("bf16", False, False, True)])
def test_adaln_compiles(dtype, gated, norm, mod):
    from dar_fast.kernels import adaln as am
    fwd, bwd = am._kernels(False)
    p = f"*{dtype}"
    ints = ("T", "C", "sgb", "sgt", "sshb", "ssht", "sscb", "ssct")
    ptx, cubin = compile_sm90(fwd, dict(x_ptr=p, g_ptr=p, y_ptr=p, sh_ptr=p, sc_ptr=p, h_ptr=p, o_ptr=p,
                                        mean_ptr="*fp32", rstd_ptr="*fp32", eps="fp32", **{n: "i32" for n in ints}),
                              dict(GATED=gated, NORM=norm, MOD=mod, BLOCK_C=1024),
                              div16=("x_ptr", "g_ptr", "y_ptr", "sh_ptr", "sc_ptr", "h_ptr", "o_ptr", "C", "sgb",
                                     "sgt", "sshb", "ssht", "sscb", "ssct"))
    assert cubin and "div.full" not in ptx and "sqrt.approx" not in ptx
    assert re.search(r"ld\.global(\.nc)?\.v[24]", ptx)
    ints = ("T", "C", "sgb", "sgt", "sscb", "ssct")
    ptx, cubin = compile_sm90(bwd, dict(h_ptr=p, g_ptr=p, y_ptr=p, sc_ptr=p, mean_ptr="*fp32", rstd_ptr="*fp32",
                                        go_ptr=p, gh_ptr=p, dh_ptr=p, dsc_ptr=p, dy_ptr=p, dg_ptr=p,
                                        **{n: "i32" for n in ints}),
                              dict(GATED=gated, NORM=norm, MOD=mod, HAS_GH=gated, BLOCK_C=1024),
                              div16=("h_ptr", "go_ptr", "dh_ptr", "C"))
    assert cubin and "div.full" not in ptx


@pytest.mark.parametrize("dtype,G,single", [("bf16", 1, True), ("bf16", 4, False), ("fp32", 1, False)])
def test_decode_attention_compiles(dtype, G, single):
    from dar_fast.kernels import decode_attention as dm
    split_k, combine = dm._kernels(False)
    ints = ("Hk", "S_max", "chunk", "n_splits", "sqb", "sqh", "skb", "skh", "sks", "svb", "svh", "svs", "sob",
            "soh", "slen")
    p = f"*{dtype}"
    ptx, cubin = compile_sm90(split_k, dict(q_ptr=p, k_ptr=p, v_ptr=p, len_ptr="*i32", o_ptr=p, m_ptr="*fp32",
                                            l_ptr="*fp32", acc_ptr="*fp32", qk_scale="fp32",
                                            **{n: "i32" for n in ints}),
                              dict(G=G, G_PAD=16, D=64, BLOCK_D=64, BLOCK_N=64, SINGLE=single,
                                   F32_DOT=dtype == "fp32"),
                              div16=("q_ptr", "k_ptr", "v_ptr", "o_ptr", "sqb", "sqh", "skb", "skh", "sks", "svb",
                                     "svh", "svs", "sob", "soh"))
    assert cubin and "div.full" not in ptx
    assert re.search(r"ld\.global(\.nc)?\.v[24]", ptx)                   # K/V rows with vector loads
    if dtype == "bf16":
        assert "mma" in ptx                                              # tensor-core dots (wgmma / mma.sync)
    ptx, cubin = compile_sm90(combine, dict(o_ptr=p, m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", Hq="i32",
                                            n_splits="i32", sob="i32", soh="i32"),
                              dict(D=64, BLOCK_D=64, SPLITS_PAD=8))
    assert cubin and "div.full" not in ptx


def test_noise_compiles_exact():
    """Float64 constants kept at full precision, IEEE div / sqrt, and no FMA contraction (launched with
    enable_fp_fusion=False): what makes the GPU noise bit-identical to the CPU reference."""
    import struct
    from dar_fast.kernels import noise as nm
    ptx, cubin = compile_sm90(nm._kernel(False), dict(seed_ptr="*i64", sid_ptr="*i64", out_ptr="*fp32", n="i32"),
                              dict(BLOCK=256), div16=("out_ptr",), enable_fp_fusion=False)
    assert cubin and "fma.rn.f64" not in ptx and "div.rn.f64" in ptx and "sqrt.rn.f64" in ptx
    assert "approx.f64" not in ptx and "approx.ftz.f64" not in ptx
    hexes = set(re.findall(r"0d([0-9A-F]{16})", ptx))
    missing = [c for c in nm.f64_constants() if not {struct.pack(">d", c).hex().upper(),
                                                      struct.pack(">d", -c).hex().upper()} & hexes
               and c not in (0.5, 1.0, 2.0)]                                # x - c may compile to x + (-c)
    assert not missing, missing                                           # none rounded to float32


def test_compiles_after_the_interpreter_leaves_triton_language_patched(monkeypatch):
    """Triton's interpreter can leave triton.language patched (a device-function call restores nothing); the
    fixture above undoes it: patch as that call does, then compile a kernel."""
    import triton.language as tl
    from triton.runtime import interpreter
    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")     # lower for real (a cached cubin would hide the leak)

    from conftest import restore_triton_language
    scope = {"tl": tl}
    exec("def device_fn():\n    pass\n", scope)           # a jit function body's globals see triton.language
    interpreter._patch_lang(scope["device_fn"])          # what the interpreter's device-call path leaves behind
    try:
        with pytest.raises(Exception):                   # the leak is real: a compile now lowers wrongly
            test_flow_step_compiles(0, False, True)
    finally:
        restore_triton_language()
    test_flow_step_compiles(0, False, True)
