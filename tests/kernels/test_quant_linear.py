"""kernels.quant_linear: NF4 / int8 weight-only layers. The NF4 layout and values against bitsandbytes 0.50
(the oracle that runs on CPU here; torchao 0.18 has no torchao.dtypes.nf4tensor), the compiled dequantization
bitwise against kernels/reference.py, and the GEMV / tiled GEMM, forward and backward, against float64."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import QuantizedWeight, reference as R
from kernels.ops import quant_linear as ql

from tests.quant.bitsandbytes_oracle import import_bitsandbytes

from .conftest import needs_cuda, needs_native

SHAPES = [(1, 64), (7, 100), (33, 192), (130, 448), (300, 640), (5, 9)]  # odd N, K % 64 != 0, one block
DTYPES = [torch.float32, torch.bfloat16]


def bnb():
    if importlib.util.find_spec("bitsandbytes") is None:  # find_spec: importorskip would log bnb's warning
        pytest.skip("bitsandbytes is not installed (pip install -e \".[test]\")")
    return import_bitsandbytes("bitsandbytes.functional")


def quantized(kind, w) -> QuantizedWeight:
    n, k = w.shape
    if kind == "nf4":
        t = R.nf4_quantize(w)
        return QuantizedWeight("nf4", (n, k), t["codes"], t["qabsmax"], t["absmax2"], t["offset"])
    t = R.int8_quantize(w)
    return QuantizedWeight("int8", (n, k), t["qweight"], scale=t["scale"])


def test_tables_equal_bitsandbytes():
    BF = bnb()
    assert torch.equal(R.NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(R.DYNAMIC_MAP, BF.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_codes_and_values_equal_bitsandbytes(shape, dtype):
    BF = bnb()
    w = (torch.randn(shape) * 3).to(dtype)
    q, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = R.nf4_quantize(w)
    assert torch.equal(ours["codes"], q.view(-1)), "4-bit codes"
    assert torch.equal(ours["absmax2"], state.state2.absmax) and torch.equal(ours["offset"], state.offset)
    # bitsandbytes' CPU 8-bit blockwise quantizer (for the absmaxes) rounds values lying within ~1e-6 of a
    # midpoint of the dynamic map to either side; ours takes the nearest entry. So the absmax codes agree
    # except for at most one step on a rare block, where both entries are equally near.
    diff = (ours["qabsmax"].int() - state.absmax.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
    # Dequantization is value for value bitsandbytes', on its own quantized state and on ours.
    theirs = BF.dequantize_4bit(q, state)
    mine = R.nf4_dequantize(q.view(-1), state.absmax, state.state2.absmax, state.offset, shape, dtype)
    assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    state.absmax = ours["qabsmax"]
    assert torch.equal(R.nf4_dequantize(ours["codes"], ours["qabsmax"], ours["absmax2"], ours["offset"], shape, dtype),
                       BF.dequantize_4bit(q, state))


def test_nf4_dequantize_of_a_range_equals_the_whole():
    w = torch.randn(37, 100)
    t = R.nf4_quantize(w)
    whole = R.nf4_dequantize(t["codes"], t["qabsmax"], t["absmax2"], t["offset"], w.shape).reshape(-1)
    for start, count in [(0, 1), (1, 63), (63, 130), (100, 2000), (3699, 1)]:
        part = R.nf4_dequantize(t["codes"], t["qabsmax"], t["absmax2"], t["offset"], w.shape, start=start, count=count)
        assert torch.equal(part, whole[start:start + count])


def test_int8_roundtrip_error_is_half_a_step():
    w = torch.randn(33, 77)
    w[3] = 0  # a zero row keeps scale 0 and dequantizes to 0
    t = R.int8_quantize(w)
    d = R.int8_dequantize(t["qweight"], t["scale"])
    assert t["qweight"].dtype == torch.int8 and int(t["qweight"].abs().max()) <= 127
    assert bool(((d - w).abs() <= t["scale"][:, None] / 2 * (1 + 1e-6)).all()) and bool((d[3] == 0).all())


@needs_native
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_tile_dequantization_is_bitwise_the_reference(kind, shape, dtype):
    qw = quantized(kind, torch.randn(shape))
    n = shape[0]
    for row0, rows in [(0, n), (n // 3, max(1, n // 2)), (n - 1, 1)]:
        got = ql._dequant(kernels._ext, qw, dtype, row0, rows)
        assert torch.equal(got, qw.dequantize(dtype, row0, rows)), (row0, rows)


def expected64(x, qw, b, dtype):
    """F.linear in float64 of x and W dequantized in the compute dtype (what both paths multiply), and the
    magnitude sum_k |x||w| + |b| that bounds the fp32 accumulation error."""
    w = qw.dequantize(dtype).double()
    bd = None if b is None else b.double()
    return F.linear(x.double(), w, bd), F.linear(x.double().abs(), w.abs(), None if b is None else bd.abs())


def assert_matches_float64(y, ref, mag, dtype):
    err = (y.double() - ref).abs()
    # fp32: a few eps of the magnitude sum. bf16: plus one rounding of the output (2^-9 relative), and either
    # the tiled path's bf16 partial sums of dx (one rounding per tile) or the GEMV's use of the fp32 weight
    # values where the reference rounds W to bf16 first (2^-9 of the magnitude at most).
    tol = 2e-6 * mag + (2.0**-8 * (ref.abs() + mag) if dtype == torch.bfloat16 else 0)
    assert bool((err <= tol + 1e-30).all()), f"max err {err.max():.3g}, worst margin {(err - tol).max():.3g}"


ROWS = [1, 2, 3, 5, 8, 9, 37]  # GEMV (<= 8 rows) and the tiled GEMM


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "torch"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(33, 192), (130, 448), (7, 100)])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_float64(backend, kind, shape, rows, dtype):
    qw = quantized(kind, torch.randn(shape) / shape[1] ** 0.5)
    x = torch.randn(rows, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    y = kernels.quant_linear(x, qw, b, backend=backend)
    assert y.dtype == dtype and y.shape == (rows, shape[0])
    if backend == "native" and kind == "int8" and rows <= ql.GEMV_MAX_ROWS:
        x = int16_rounded(x)  # the CPU int8 GEMV multiplies x rounded to int16 blocks, exactly
    assert_matches_float64(y, *expected64(x, qw, b, dtype), dtype)


def int16_rounded(x):
    """x as reference.int16_blocks rounds it, in float64 (q * scale is exact there)."""
    q, scale = R.int16_blocks(x)
    k = x.shape[-1]
    return (q.double().reshape(*x.shape[:-1], -1, 64) * scale.double()[..., None]).flatten(-2)[..., :k]


@pytest.mark.parametrize("k", [1, 63, 64, 100, 4864])
def test_int16_blocks_round_to_half_a_step_of_the_block_max(k):
    x = torch.randn(3, k) * torch.logspace(-3, 3, k)  # blocks of very different scales
    x[1, : min(k, 64)] = 0.0  # an all-zero block: scale 0, q 0
    q, scale = R.int16_blocks(x)
    assert q.shape == (3, -(-k // 64) * 64) and scale.shape == (3, -(-k // 64))
    assert q.abs().max() <= 32767 and not q[:, k:].any()
    top = F.pad(x, (0, (-k) % 64)).abs().reshape(3, -1, 64).amax(-1)
    err = (int16_rounded(x) - x.double()).abs()
    # half a step, plus the fp32 rounding of x * (32767 / max) (< 2^-24 of 32767 steps)
    bound = (top.double() * (0.5 + 2.0**-8) / 32767).repeat_interleave(64, dim=-1)[:, :k]
    assert bool((err <= bound).all())
    assert torch.equal(int16_rounded(x)[1, : min(k, 64)], torch.zeros(min(k, 64), dtype=torch.float64))


@needs_native
@pytest.mark.parametrize("k", [1, 63, 64, 65, 448, 4864])
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_int8_gemv_is_the_integer_product_of_int16_blocks(k, rows):
    """Against the float64 product of the rounded x: the integer sums are exact, so only the fp32 sum of the
    scaled blocks is left (a few eps of the magnitude). Large K and mixed scales check the int32 range."""
    qw = quantized("int8", torch.randn(37, k))
    x = torch.randn(rows, k) * torch.logspace(-2, 2, k)
    y = kernels.quant_linear(x, qw, backend="native")
    assert_matches_float64(y, *expected64(int16_rounded(x), qw, None, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "torch"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_gives_dx_only_and_matches_float64(backend, kind, dtype):
    n, k = 130, 192
    qw = quantized(kind, torch.randn(n, k) / k ** 0.5)
    x = torch.randn(2, 19, k).to(dtype).requires_grad_(True)
    dy = torch.randn(2, 19, n).to(dtype)
    kernels.quant_linear(x, qw, None, backend=backend).backward(dy)
    w = qw.dequantize(dtype).double()
    ref, mag = dy.double() @ w, dy.double().abs() @ w.abs()
    assert x.grad.dtype == dtype
    assert_matches_float64(x.grad, ref, mag, dtype)


@needs_native
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_many_tiles_equal_one_tile(kind, monkeypatch):
    n, k = 301, 128
    qw = quantized(kind, torch.randn(n, k))
    x = torch.randn(40, k, requires_grad=True)
    y1 = kernels.quant_linear(x, qw, None, backend="native")
    (g1,) = torch.autograd.grad(y1.sum(), x)
    monkeypatch.setattr(ql, "TILE_ELEMS", 64 * k)  # 5 tiles of ~61 rows
    assert len(ql._tiles(n, k)) == 5
    y5 = kernels.quant_linear(x, qw, None, backend="native")
    (g5,) = torch.autograd.grad(y5.sum(), x)
    assert torch.equal(y1, y5)  # each output column comes from one tile: the same GEMM per column
    torch.testing.assert_close(g5, g1, rtol=1e-5, atol=1e-5)  # dx adds the tiles in another order


@needs_native
def test_tiles_reuse_one_buffer_that_never_escapes():
    """Dequantized tiles are carved from one kept buffer (no fresh mapping per tile); outputs are new tensors."""
    k = 128
    qa, qb = quantized("nf4", torch.randn(96, k)), quantized("int8", torch.randn(80, k))
    x = torch.randn(20, k)
    ya = kernels.quant_linear(x, qa, None, backend="native")
    ptr = ql._workspace.buf.data_ptr()
    yb = kernels.quant_linear(x, qb, None, backend="native")
    assert ql._workspace.buf.data_ptr() == ptr  # the second layer's tile fit the buffer the first one made
    torch.testing.assert_close(ya, F.linear(x, qa.dequantize()), rtol=1e-5, atol=1e-5)  # not overwritten by qb's tile
    torch.testing.assert_close(yb, F.linear(x, qb.dequantize()), rtol=1e-5, atol=1e-5)
    kernels.release_workspace()
    assert ql._workspace.buf is None


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "torch"])
def test_autocast_computes_in_bf16_like_f_linear(backend):
    qw = quantized("nf4", torch.randn(96, 128) / 11)
    x = torch.randn(50, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.quant_linear(x, qw, None, backend=backend)
        ref = F.linear(x, qw.dequantize(torch.float32))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2)


def test_bad_arguments_name_what_was_expected():
    qw = quantized("int8", torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K=16\]"):
        kernels.quant_linear(torch.randn(2, 15), qw)
    with pytest.raises(ValueError, match=r"bias must be \[N\]=\[8\]"):
        kernels.quant_linear(torch.randn(2, 16), qw, torch.randn(7))
    with pytest.raises(ValueError, match="QuantizedWeight"):
        kernels.quant_linear(torch.randn(2, 16), torch.randn(8, 16))


@needs_native
def test_compiled_entries_check_every_buffer():
    qw = quantized("nf4", torch.randn(8, 64))
    args = list(ql._weight_args(qw))
    ext = kernels._ext
    with pytest.raises(ValueError, match=r"quant_dequant_cpu: rows: expected a row range"):
        ext.quant_dequant_cpu(*args, 4, 5, torch.empty(5, 64), 1)
    with pytest.raises(ValueError, match=r"out: expected a contiguous \[2, 64\]"):
        ext.quant_dequant_cpu(*args, 0, 2, torch.empty(3, 64), 1)
    bad = list(args)
    bad[4] = bad[4][:-1]  # qabsmax one short
    with pytest.raises(ValueError, match=r"qabsmax: expected a contiguous uint8 \[8\]"):
        ext.quant_gemv_cpu(*bad, torch.randn(1, 64), None, torch.empty(1, 8), 1)
    with pytest.raises(ValueError, match=r"x: expected a contiguous \[M <= 8, K=64\]"):
        ext.quant_gemv_cpu(*args, torch.randn(9, 64), None, torch.empty(9, 8), 1)
    i8 = quantized("int8", torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"codes: expected a contiguous int8 \[8, 64\]"):
        ext.quant_gemv_cpu(1, 8, 64, i8.codes.view(torch.uint8), None, None, None, None, 0.0, i8.scale,
                           torch.randn(1, 64), None, torch.empty(1, 8), 1)


def test_off_cpu_is_the_reference_and_native_says_why():
    qw = quantized("int8", torch.randn(8, 16))
    x = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64 is not supported natively"):
        kernels.quant_linear(x, qw, backend="native")
    torch.testing.assert_close(kernels.quant_linear(x, qw), F.linear(x, qw.dequantize(torch.float64)))


@needs_cuda
def test_cuda_gemv_matches_float64():
    qw = quantized("nf4", torch.randn(96, 128))
    qc = QuantizedWeight("nf4", qw.shape, *(t.cuda() for t in (qw.codes, qw.qabsmax, qw.absmax2, qw.offset)))
    x = torch.randn(3, 128)
    y = kernels.quant_linear(x.cuda(), qc).cpu()
    assert_matches_float64(y, *expected64(x, qw, None, torch.float32), torch.float32)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_in_chunks_equals_quantizing_whole(kind, monkeypatch):
    """Quantizing QUANTIZE_CHUNK elements at a time (bounded memory) gives the whole-tensor codes exactly."""
    torch.manual_seed(5)
    w = torch.randn(37, 203) * torch.rand(37, 1)  # 7511 elements: blocks straddle rows, an odd tail
    fn = R.nf4_quantize if kind == "nf4" else R.int8_quantize
    whole = fn(w)
    monkeypatch.setattr(R, "QUANTIZE_CHUNK", 128)  # many chunks, the last one partial
    chunked = fn(w)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
