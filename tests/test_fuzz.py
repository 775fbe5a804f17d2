"""Fuzzing with hypothesis: malformed op arguments (and, in test_fuzz_checkpoints.py, tampered checkpoints) end in a
ValueError / TypeError that names the problem, or succeed with the right result; never a crash, another exception
type or a read out of bounds.

Each case starts from a valid input (a BSR or channel-sparse weight and an input; a checkpoint written by
``pysparse.save``) and applies one mutation drawn from a table: every table entry says which outcome is right. The
runs are derandomized (the same cases every run) and bounded (2,200 cases with the checkpoints', under two
minutes). The C++ index check sees the malformed index arrays again under ASan / UBSan in
``tests/cpp/test_check_indices.cpp``.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysparse import ops


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


OK = "ok"  # the mutation is harmless: the call must succeed and equal the reference


def expect_outcome(run, expected: str, reference=None) -> None:
    """``expected`` is OK or ``"<ValueError|TypeError>:<regex the message must match>"``."""
    if expected == OK:
        got = run()
        want = reference()
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    kind, pattern = expected.split(":", 1)
    error = {"ValueError": ValueError, "TypeError": TypeError}[kind]
    try:
        run()
    except (ValueError, TypeError) as exc:
        assert isinstance(exc, error), f"expected {kind}, got {type(exc).__name__}: {exc}"
        assert re.search(pattern, str(exc)), f"{type(exc).__name__} does not name {pattern!r}: {exc}"
        return
    raise AssertionError(f"accepted a malformed argument (expected {kind} naming {pattern!r})")


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, not contiguous (every other element of a twice-as-long buffer)."""
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype) if t.dim() else t
    if t.dim() == 0:
        return t
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert t.numel() <= 1 or not out.is_contiguous() or t.shape[-1] <= 1
    return out


# ---- bsr_linear ------------------------------------------------------------------------------------------------------
def _bsr_case(draw) -> dict:
    bh, bw = draw(st.sampled_from([(1, 1), (2, 3), (4, 4), (8, 8), (5, 7), (16, 16)]))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    m = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    nbr, nbc = -(-n // bh), -(-k // bw)
    keep = torch.rand(nbr, nbc, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    crow = torch.zeros(nbr + 1, dtype=torch.int32)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].to(torch.int32)
    nnz = int(col.numel())
    return {"input": torch.randn(m, k, generator=g), "values": torch.randn(nnz, bh, bw, generator=g),
            "crow_indices": crow, "col_indices": col,
            "bias": torch.randn(n, generator=g) if draw(st.booleans()) else None, "out_features": n,
            "check_indices": draw(st.booleans())}


def _bsr_reference(c: dict) -> torch.Tensor:
    values = c["values"]
    _, bh, bw = values.shape
    n, k = c["out_features"], c["input"].shape[-1]
    nbr = -(-n // bh)
    w = torch.zeros(nbr * bh, -(-k // bw) * bw, dtype=torch.float64)
    crow, col = c["crow_indices"].long(), c["col_indices"].long()
    for r in range(nbr):
        for b in range(int(crow[r]), int(crow[r + 1])):
            w[r * bh:(r + 1) * bh, int(col[b]) * bw:(int(col[b]) + 1) * bw] = values[b].double()
    bias = None if c["bias"] is None else c["bias"].double()
    return F.linear(c["input"].double(), w[:n, :k], bias).to(c["input"].dtype)


def _row_with_two(crow: torch.Tensor) -> int | None:
    steps = (crow[1:] - crow[:-1]).tolist()
    return next((r for r, s in enumerate(steps) if s >= 2), None)


def _set(c: dict, key: str, i: int, value: int, dtype=None) -> None:
    t = c[key].to(dtype or c[key].dtype).clone()
    t[i] = value
    c[key] = t


def _mutate_bsr(c: dict, what: str, draw, k: int | None = None) -> str:
    """Applies mutation ``what`` to case ``c`` (``k``: the weight's columns, when not the input's last dimension);
    returns the expected outcome."""
    nnz, n_rows = c["values"].shape[0], c["crow_indices"].numel() - 1
    n_cols = -(-(c["input"].shape[-1] if k is None else k) // c["values"].shape[2])
    i = draw(st.integers(0, max(nnz - 1, 0)))
    big = draw(st.sampled_from([0, 1, 7, 2**20, 2**31 - 1 - n_cols]))
    col_error = "ValueError:col_indices"
    if what == "none":
        return OK
    if what in ("col_out_of_range", "col_negative", "col_int64_wraps_to_valid") and nnz == 0:
        what = "crow_last_wrong"
    if what == "col_out_of_range":
        _set(c, "col_indices", i, n_cols + big)
        return col_error
    if what == "col_negative":
        _set(c, "col_indices", i, -1 - big)
        return col_error
    if what == "col_int64_wraps_to_valid":   # int64 2**32 + j would wrap to j, a valid column, if cast blindly
        _set(c, "col_indices", i, 2**32 + int(c["col_indices"][i]), torch.int64)
        return col_error
    if what in ("col_unsorted", "col_duplicate"):
        r = _row_with_two(c["crow_indices"])
        if r is None:
            return _mutate_bsr(c, "crow_decreasing", draw, k)
        a = int(c["crow_indices"][r])
        col = c["col_indices"].clone()
        if what == "col_unsorted":
            col[a], col[a + 1] = col[a + 1].clone(), col[a].clone()
        else:
            col[a + 1] = col[a]
        c["col_indices"] = col
        return "ValueError:col_indices|strictly increasing"
    if what == "crow_decreasing":
        if n_rows < 2 or nnz == 0:
            return _mutate_bsr(c, "crow_first_nonzero", draw, k)
        _set(c, "crow_indices", 1, nnz + 1 + big % 5)
        return "ValueError:crow_indices"
    if what == "crow_first_nonzero":
        _set(c, "crow_indices", 0, draw(st.sampled_from([1, -1, 2**31 - 1, -(2**31)])))
        return "ValueError:crow_indices"
    if what == "crow_last_wrong":
        _set(c, "crow_indices", -1, nnz + draw(st.sampled_from([1, -1, 2**20, 2**31 - 1 - nnz])))
        return "ValueError:crow_indices"
    if what == "crow_int64_overflow":
        _set(c, "crow_indices", -1, nnz + 2**32, torch.int64)
        return "ValueError:crow_indices"
    if what == "crow_wrong_length":
        crow = c["crow_indices"]
        c["crow_indices"] = crow[:-1] if draw(st.booleans()) else torch.cat([crow, crow[-1:]])
        return "ValueError:crow_indices"
    if what == "indices_int64":
        c["crow_indices"], c["col_indices"] = c["crow_indices"].long(), c["col_indices"].long()
        return OK
    if what == "index_dtype":
        key = draw(st.sampled_from(["crow_indices", "col_indices"]))
        c[key] = c[key].to(draw(st.sampled_from([torch.float32, torch.int16, torch.uint8, torch.bool, torch.float64])))
        return f"TypeError:{key}"
    if what == "indices_2d":
        key = draw(st.sampled_from(["crow_indices", "col_indices"]))
        c[key] = c[key].unsqueeze(0)
        return f"ValueError:{key}"
    if what == "indices_not_tensor":
        key = draw(st.sampled_from(["crow_indices", "col_indices"]))
        c[key] = c[key].tolist()
        return f"TypeError:{key}"
    if what == "values_dtype":
        c["values"] = c["values"].to(draw(st.sampled_from([torch.float64, torch.int32, torch.bfloat16])))
        return "TypeError:values"
    if what == "input_dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.int64, torch.complex64]))
        c["input"] = c["input"].to(dtype)
        return "TypeError:input"
    if what == "values_2d":
        c["values"] = c["values"].flatten(1)
        return "ValueError:values"
    if what == "values_fewer_blocks":
        if nnz == 0:
            c["values"] = torch.zeros(1, *c["values"].shape[1:])
        else:
            c["values"] = c["values"][:-1]
        return "ValueError:col_indices|values"
    if what == "bias_shape":
        c["bias"] = torch.zeros(c["out_features"] + draw(st.sampled_from([1, -1])))
        return "ValueError:bias"
    if what == "bias_dtype":
        c["bias"] = torch.zeros(c["out_features"], dtype=torch.float64)
        return "TypeError:bias"
    if what == "out_features_negative":
        c["out_features"] = -draw(st.integers(1, 2**40))
        return "ValueError:out_features"
    if what == "out_features_not_int":
        c["out_features"] = draw(st.sampled_from([float(c["out_features"]), True, "8", None]))
        return "TypeError:out_features"
    if what == "out_features_wrong":   # fewer or more rows than the indices describe
        c["out_features"] += draw(st.sampled_from([c["values"].shape[1], -c["values"].shape[1]]))
        if c["out_features"] < 0:
            return "ValueError:out_features"
        return "ValueError:crow_indices"
    if what == "input_0d":
        c["input"] = torch.tensor(1.0)
        return "ValueError:input"
    if what == "input_not_tensor":
        c["input"] = c["input"].tolist()
        return "TypeError:input"
    if what == "non_contiguous":
        for key in draw(st.sets(st.sampled_from(["input", "values", "crow_indices", "col_indices"]), min_size=1)):
            c[key] = _strided(c[key])
        return OK
    if what == "zero_rows":
        c["input"] = c["input"][:0]
        return OK
    if what == "no_blocks":
        c["values"] = c["values"][:0]
        c["col_indices"] = c["col_indices"][:0]
        c["crow_indices"] = torch.zeros_like(c["crow_indices"])
        return OK
    if what == "activation":
        c["activation"] = draw(st.sampled_from(["tanh", "RELU", "", 3]))
        return "ValueError:activation"
    if what == "residual":
        m = c["input"].shape[0]
        shape = draw(st.sampled_from([(m, c["out_features"] + 1), (m + 1, c["out_features"]), (c["out_features"],)]))
        c["residual"] = torch.zeros(shape)
        try:  # added as torch's + would: a residual that broadcasts is fine
            torch.broadcast_shapes((m, c["out_features"]), shape)
        except RuntimeError:
            return "ValueError:residual"
        return OK
    raise AssertionError(what)


BSR_MUTATIONS = ["none", "col_out_of_range", "col_negative", "col_int64_wraps_to_valid", "col_unsorted",
                 "col_duplicate", "crow_decreasing", "crow_first_nonzero", "crow_last_wrong", "crow_int64_overflow",
                 "crow_wrong_length", "indices_int64", "index_dtype", "indices_2d", "indices_not_tensor",
                 "values_dtype", "input_dtype", "values_2d", "values_fewer_blocks", "bias_shape", "bias_dtype",
                 "out_features_negative", "out_features_not_int", "out_features_wrong", "input_0d",
                 "input_not_tensor", "non_contiguous", "zero_rows", "no_blocks", "activation", "residual"]


@fuzz_settings(900)
@given(st.data())
def test_fuzz_bsr_linear_arguments(data):
    c = _bsr_case(data.draw)
    what = data.draw(st.sampled_from(BSR_MUTATIONS), label="mutation")
    expected = _mutate_bsr(c, what, data.draw)

    def reference():
        y = _bsr_reference(c)
        if c.get("residual") is not None:
            y = y + c["residual"]
        return y

    expect_outcome(lambda: ops.bsr_linear(**c), expected, reference)


# ---- bsr_conv2d_nhwc: the index mutations of bsr_linear, and the convolution's own arguments -------------------------
CONV_INDEX_MUTATIONS = ["none", "col_out_of_range", "col_negative", "col_int64_wraps_to_valid", "col_unsorted",
                        "col_duplicate", "crow_decreasing", "crow_first_nonzero", "crow_last_wrong",
                        "crow_int64_overflow", "crow_wrong_length", "indices_int64", "index_dtype", "indices_2d",
                        "values_dtype", "non_contiguous", "no_blocks"]
CONV_OWN_MUTATIONS = ["kernel_size", "stride", "input_rank", "input_too_small", "bias_shape", "out_channels"]


@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_bsr_conv2d_nhwc_arguments(data):
    draw = data.draw
    ch, kh, kw, o = draw(st.sampled_from([8, 16])), draw(st.integers(1, 3)), draw(st.integers(1, 3)), 8 * draw(
        st.integers(1, 3))
    bh, bw = 8, draw(st.sampled_from([4, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    k = kh * kw * ch
    keep = torch.rand(o // bh, k // bw, generator=g) < draw(st.sampled_from([0.0, 0.4, 1.0]))
    crow = torch.zeros(o // bh + 1, dtype=torch.int32)
    crow[1:] = keep.sum(1).cumsum(0)
    c = {"input": torch.randn(draw(st.integers(1, 2)), kh + 3, kw + 2, ch, generator=g),
         "values": torch.randn(int(keep.sum()), bh, bw, generator=g), "crow_indices": crow,
         "col_indices": keep.nonzero()[:, 1].to(torch.int32),
         "bias": torch.randn(o, generator=g) if draw(st.booleans()) else None, "out_channels": o,
         "kernel_size": (kh, kw), "stride": draw(st.sampled_from([1, 2, (1, 2)]))}
    what = draw(st.sampled_from(CONV_INDEX_MUTATIONS + CONV_OWN_MUTATIONS), label="mutation")
    if what == "non_contiguous":   # NHWC input is read in place: only the weight's arrays may be strided
        for key in draw(st.sets(st.sampled_from(["values", "crow_indices", "col_indices"]), min_size=1)):
            c[key] = _strided(c[key])
        expected = OK
    elif what in CONV_INDEX_MUTATIONS:
        expected = _mutate_bsr(c, what, draw, k)
    elif what == "kernel_size":
        c["kernel_size"] = draw(st.sampled_from([(0, kw), (kh, -1), (kh + 1, kw), (kh, kw, 1)]))
        expected = "ValueError:kernel_size|crow_indices|col_indices"
    elif what == "stride":
        c["stride"] = draw(st.sampled_from([0, (1, 0), -1, (1, 1, 1)]))
        expected = "ValueError:stride"
    elif what == "input_rank":
        c["input"] = c["input"][0]
        expected = "ValueError:input"
    elif what == "input_too_small":
        c["input"] = c["input"][:, : kh - 1] if kh > 1 else c["input"][:, :0]
        expected = "ValueError:input"
    elif what == "bias_shape":
        c["bias"] = torch.zeros(o + 1)
        expected = "ValueError:bias"
    else:
        c["out_channels"] = draw(st.sampled_from([0, -8, o + 8, 1.0]))
        expected = "TypeError:out_channels" if isinstance(c["out_channels"], float) else (
            "ValueError:out_channels|crow_indices")
    expect_outcome(lambda: ops.bsr_conv2d_nhwc(**c), expected, lambda: ops.bsr_conv2d_nhwc_reference(**c))


# ---- channel-sparse linear and conv2d --------------------------------------------------------------------------------
def _channel_case(draw, conv: bool) -> dict:
    n, k = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    out_index = (torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))).nonzero()[:, 0].to(torch.int32)
    in_index = (torch.rand(k, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))).nonzero()[:, 0].to(torch.int32)
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if conv else ()
    c = {"values": torch.randn(out_index.numel(), in_index.numel(), *kernel, generator=g),
         "out_index": out_index, "in_index": in_index,
         "bias": torch.randn(n, generator=g) if draw(st.booleans()) else None,
         "check_indices": draw(st.booleans())}
    if conv:
        c["input"] = torch.randn(draw(st.integers(1, 3)), k, 5, 6, generator=g)
        c["out_channels"], c["padding"] = n, draw(st.sampled_from([0, 1, (1, 0)]))
    else:
        c["input"] = torch.randn(draw(st.integers(1, 5)), k, generator=g)
        c["out_features"] = n
    return c


def _channel_reference(c: dict, conv: bool) -> torch.Tensor:
    if conv:
        return ops.channel_sparse_conv2d_reference(c["input"], c["values"], c["out_index"], c["in_index"], c["bias"],
                                                   c["out_channels"], padding=c["padding"])
    return ops.channel_sparse_linear_reference(c["input"], c["values"], c["out_index"], c["in_index"], c["bias"],
                                               c["out_features"])


def _mutate_channel(c: dict, what: str, draw, conv: bool) -> str:
    n_key = "out_channels" if conv else "out_features"
    key = draw(st.sampled_from(["out_index", "in_index"]))
    limit = c[n_key] if key == "out_index" else c["input"].shape[1 if conv else -1]
    size = c[key].numel()
    i = draw(st.integers(0, max(size - 1, 0)))
    if what == "none":
        return OK
    if what in ("out_of_range", "negative", "int64_wraps_to_valid", "unsorted", "duplicate") and size < 2:
        what = "index_dtype"
    if what == "out_of_range":
        _set(c, key, i, limit + draw(st.sampled_from([0, 1, 2**20, 2**31 - 1 - limit])))
        return f"ValueError:{key}"
    if what == "negative":
        _set(c, key, i, -draw(st.sampled_from([1, 2**31])), torch.int64)
        return f"ValueError:{key}"
    if what == "int64_wraps_to_valid":
        _set(c, key, i, 2**32 + int(c[key][i]), torch.int64)
        return f"ValueError:{key}"
    if what == "unsorted":
        t = c[key].clone()
        t[0], t[1] = t[1].clone(), t[0].clone()
        c[key] = t
        return f"ValueError:{key}"
    if what == "duplicate":
        _set(c, key, 1, int(c[key][0]))
        return f"ValueError:{key}"
    if what == "index_dtype":
        c[key] = c[key].to(draw(st.sampled_from([torch.float32, torch.int16, torch.uint8, torch.bool])))
        return f"TypeError:{key}"
    if what == "index_2d":
        c[key] = c[key].unsqueeze(0)
        return f"ValueError:{key}"
    if what == "indices_int64":
        c["out_index"], c["in_index"] = c["out_index"].long(), c["in_index"].long()
        return OK
    if what == "values_shape":
        c["values"] = torch.zeros(c["values"].shape[0] + 1, *c["values"].shape[1:])
        return "ValueError:values"
    if what == "values_dtype":
        c["values"] = c["values"].to(draw(st.sampled_from([torch.float64, torch.int32, torch.bfloat16])))
        return "TypeError:values"
    if what == "input_dtype":
        c["input"] = c["input"].to(draw(st.sampled_from([torch.float64, torch.int64])))
        return "TypeError:input"
    if what == "bias_shape":
        c["bias"] = torch.zeros(c[n_key] + 1)
        return "ValueError:bias"
    if what == "fewer_outputs":   # a dense layer with fewer outputs than are kept
        c[n_key] = max(c["out_index"].numel() - 1, 0) if c["out_index"].numel() else -1
        return f"ValueError:{n_key}|out_index|bias"
    if what == "n_not_int":
        c[n_key] = draw(st.sampled_from([float(c[n_key]), "3", None]))
        return f"TypeError:{n_key}"
    if what == "non_contiguous":
        for name in draw(st.sets(st.sampled_from(["input", "values", "out_index", "in_index"]), min_size=1)):
            c[name] = c[name].transpose(-1, -2) if name == "input" and conv else _strided(c[name])
            if name == "input" and conv:
                c[name] = c[name].contiguous().transpose(-1, -2)   # same shape, other strides
        return OK
    if what == "zero_batch":
        c["input"] = c["input"][:0]
        return OK
    if what == "input_rank":
        c["input"] = c["input"].flatten() if conv else torch.tensor(1.0)
        return "ValueError:input"
    if what == "padding":
        if not conv:
            return OK
        c["padding"] = draw(st.sampled_from([-1, (1, -2), (1, 2, 3), "same", 1.5]))
        return "ValueError|TypeError:padding"
    raise AssertionError(what)


CHANNEL_MUTATIONS = ["none", "out_of_range", "negative", "int64_wraps_to_valid", "unsorted", "duplicate",
                     "index_dtype", "index_2d", "indices_int64", "values_shape", "values_dtype", "input_dtype",
                     "bias_shape", "fewer_outputs", "n_not_int", "non_contiguous", "zero_batch", "input_rank",
                     "padding"]


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
@fuzz_settings(400)
@given(data=st.data())
def test_fuzz_channel_sparse_arguments(conv, data):
    c = _channel_case(data.draw, conv)
    what = data.draw(st.sampled_from(CHANNEL_MUTATIONS), label="mutation")
    expected = _mutate_channel(c, what, data.draw, conv)
    if expected.startswith("ValueError|TypeError:"):
        try:
            (ops.channel_sparse_conv2d if conv else ops.channel_sparse_linear)(**c)
        except (ValueError, TypeError) as exc:
            assert "padding" in str(exc), exc
            return
        raise AssertionError("accepted a malformed padding")
    op = ops.channel_sparse_conv2d if conv else ops.channel_sparse_linear
    expect_outcome(lambda: op(**c), expected, lambda: _channel_reference(c, conv))
