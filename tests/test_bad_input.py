"""Bad input to bsr_linear raises ValueError / TypeError naming the argument (never a crash, never a wrong result).

Each case starts from one valid call (W 10 x 13 in 4 x 5 blocks, 3 of the 3 x 3 grid kept) and breaks one thing.
Callers: the Python wrapper (with and without its index check) and the registered op torch.ops.pysparse.bsr_linear,
whose CPU kernel checks the indices itself. On CUDA the kernels do not re-check indices (they clamp), so index
errors are tested there through the checking wrapper only.
"""
from dataclasses import dataclass, field

import pytest
import torch

from conftest import cuda_available
from pysparse import ops


def valid_args(device="cpu", dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        input=torch.randn(6, 13, generator=gen).to(device, dtype),
        values=torch.randn(3, 4, 5, generator=gen).to(device, dtype),
        crow_indices=torch.tensor([0, 2, 2, 3], dtype=torch.int32, device=device),
        col_indices=torch.tensor([0, 2, 1], dtype=torch.int32, device=device),
        bias=torch.randn(10, generator=gen).to(device, dtype),
        out_features=10,
    )


@dataclass
class Bad:
    change: dict                # argument name -> new value, or a function of the valid args dict
    error: type
    match: str                  # regex the message must contain (the argument's name)
    kind: str = "meta"          # "index": a malformed BSR layout; "meta": dtype/shape; "python": not a tensor/int
    callers: tuple = field(default=("wrapper", "wrapper_nocheck", "op"))

    def args(self, device) -> dict:
        args = valid_args(device)
        for name, value in self.change.items():
            args[name] = value(args) if callable(value) else value
        return args


def i32(*values):
    return lambda args: torch.tensor(values, dtype=torch.int32, device=args["input"].device)


BAD = {
    # malformed indices
    "crow not monotone": Bad({"crow_indices": i32(0, 2, 1, 3)}, ValueError, "crow_indices", "index"),
    "crow[0] != 0": Bad({"crow_indices": i32(1, 2, 2, 3)}, ValueError, r"crow_indices\[0\]", "index"),
    "crow negative": Bad({"crow_indices": i32(0, -1, 2, 3)}, ValueError, "crow_indices", "index"),
    "crow[-1] < nnz": Bad({"crow_indices": i32(0, 1, 1, 2)}, ValueError, "crow_indices", "index"),
    "crow[-1] > nnz": Bad({"crow_indices": i32(0, 2, 2, 4)}, ValueError, "crow_indices", "index"),
    "crow huge": Bad({"crow_indices": i32(0, 2, 2**31 - 1, 3)}, ValueError, "crow_indices", "index"),
    "col out of range": Bad({"col_indices": i32(0, 3, 1)}, ValueError, "col_indices", "index"),
    "col huge": Bad({"col_indices": i32(0, 2**31 - 1, 1)}, ValueError, "col_indices", "index"),
    "col negative": Bad({"col_indices": i32(0, 2, -1)}, ValueError, "col_indices", "index"),
    "col unsorted": Bad({"col_indices": i32(2, 0, 1)}, ValueError, "col_indices", "index"),
    "col duplicate": Bad({"col_indices": i32(2, 2, 1)}, ValueError, "col_indices", "index"),
    # negative int64 entries are refused before the int32 conversion could wrap them
    "col negative int64": Bad({"col_indices": lambda a: torch.tensor([0, 2, -1], device=a["input"].device)},
                              ValueError, "col_indices", "index", ("wrapper", "wrapper_nocheck")),
    # 2**32 + 2 wraps to the valid column 2 in int32: it must be refused, not silently used as 2
    "col beyond int32": Bad({"col_indices": lambda a: torch.tensor([0, 2**32 + 2, 1], device=a["input"].device)},
                            ValueError, "col_indices", "index", ("wrapper", "wrapper_nocheck")),
    # wrong dtypes
    "int input": Bad({"input": lambda a: a["input"].to(torch.int64)}, TypeError, "input"),
    "float64 input and weight": Bad({"input": lambda a: a["input"].double(), "values": lambda a: a["values"].double(),
                                     "bias": lambda a: a["bias"].double()}, TypeError, "input"),
    "values dtype != input": Bad({"values": lambda a: a["values"].bfloat16()}, TypeError, "values"),
    "bias dtype != input": Bad({"bias": lambda a: a["bias"].half()}, TypeError, "bias"),
    "float crow": Bad({"crow_indices": lambda a: a["crow_indices"].float()}, TypeError, "crow_indices"),
    "float col": Bad({"col_indices": lambda a: a["col_indices"].float()}, TypeError, "col_indices"),
    "bool col": Bad({"col_indices": lambda a: a["col_indices"].bool()}, TypeError, "col_indices"),
    "int64 indices to the op": Bad({"crow_indices": lambda a: a["crow_indices"].long()}, TypeError, "int32",
                                   callers=("op",)),
    # mismatched shapes
    "K too small for the blocks": Bad({"input": lambda a: a["input"][:, :9]}, ValueError, "col_indices", "index"),
    "crow too short": Bad({"crow_indices": i32(0, 2, 3)}, ValueError, "crow_indices"),
    "crow too long": Bad({"crow_indices": i32(0, 2, 2, 3, 3)}, ValueError, "crow_indices"),
    "crow 2-D": Bad({"crow_indices": lambda a: a["crow_indices"][None]}, ValueError, "crow_indices"),
    "col count != blocks": Bad({"col_indices": i32(0, 2)}, ValueError, "col_indices"),
    "out_features too large for crow": Bad({"out_features": 13}, ValueError, "crow_indices"),
    "negative out_features": Bad({"out_features": -1}, ValueError, "out_features"),
    "bias shape": Bad({"bias": lambda a: a["bias"][:9]}, ValueError, "bias"),
    "bias 2-D": Bad({"bias": lambda a: a["bias"][None]}, ValueError, "bias"),
    "values 2-D": Bad({"values": lambda a: a["values"].flatten(1)}, ValueError, "values"),
    "values with a 0 block dim": Bad({"values": lambda a: a["values"][:, :0]}, ValueError, "block size"),
    "0-d input": Bad({"input": lambda a: a["input"][0, 0]}, ValueError, "input"),
    # not tensors / not ints (the registered op's schema parser rejects these before our code runs)
    "input not a tensor": Bad({"input": [[1.0] * 13]}, TypeError, "input", "python", ("wrapper",)),
    "values not a tensor": Bad({"values": 1.0}, TypeError, "values", "python", ("wrapper",)),
    "crow not a tensor": Bad({"crow_indices": [0, 2, 2, 3]}, TypeError, "crow_indices", "python", ("wrapper",)),
    "bias not a tensor": Bad({"bias": 1.0}, TypeError, "bias", "python", ("wrapper",)),
    "out_features float": Bad({"out_features": 10.0}, TypeError, "out_features", "python", ("wrapper",)),
    "out_features bool": Bad({"out_features": True}, TypeError, "out_features", "python", ("wrapper",)),
}


def call(caller: str, args: dict):
    if caller == "op":
        return torch.ops.pysparse.bsr_linear(*args.values())
    return ops.bsr_linear(*args.values(), check_indices=caller == "wrapper")


def test_the_valid_call_works(device):
    args = valid_args(device)
    out = call("op", args)
    ref = ops.bsr_linear_reference(*args.values())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,caller", [(name, caller) for name, bad in BAD.items() for caller in bad.callers])
def test_bad_input_raises(name, caller, device):
    bad = BAD[name]
    if device.type == "cuda" and bad.kind == "index" and caller != "wrapper":
        pytest.skip("the CUDA kernels clamp malformed indices instead of checking them; the wrapper checks")
    args = bad.args(device)
    with pytest.raises(bad.error, match=bad.match):
        call(caller, args)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a CUDA build of pysparse")
@pytest.mark.parametrize("caller", ["wrapper", "op"])
@pytest.mark.parametrize("moved", ["values", "crow_indices", "col_indices", "bias", "input"])
def test_arguments_on_different_devices(moved, caller):
    args = valid_args("cuda")
    args[moved] = args[moved].cpu()
    # Named: the moved argument, or (when the input moved) the first argument found on the other device.
    with pytest.raises(ValueError, match=moved if moved != "input" else "device"):
        call(caller, args)
