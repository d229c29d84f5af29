"""The launchers' plain-Python integer helpers agree with Triton's (which cost ~6 us per host call)."""
import triton

from fxfuse.runtime.kernels.host_math import cdiv, next_power_of_2


def test_host_math_matches_triton():
    for n in list(range(0, 1100)) + [2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 7, 16, 128, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
