"""Assertions shared by the distributed test files (their records come from tests/support workers)."""


def assert_grad_bytes_follow_mask(records: list[dict]) -> None:
    """Gradient bytes counted at DeepSpeed's communication backend equal the kept units' bytes.

    Exact: the test models' tensors need no alignment padding in DeepSpeed's buckets, so the
    bytes on the wire are the kept units' gradient bytes to the byte (FULL steps: all of them).
    """
    full = [rec for rec in records if rec["mode"] == "FULL"]
    drop = [rec for rec in records if rec["dropped"]]
    assert full and drop, "the run needs FULL and DROP steps"
    full_bytes = full[0]["grad_bytes_expected"]
    for rec in full:
        assert rec["grad_bytes_counted"] == full_bytes, rec["reduction_calls"]
    for rec in drop:
        assert rec["grad_bytes_expected"] < full_bytes
        assert rec["grad_bytes_counted"] == rec["grad_bytes_expected"], (rec["dropped"], rec["reduction_calls"])
