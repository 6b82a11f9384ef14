"""The HTTP/2 fuzz harness (tests/fuzz/fuzz_h2.py) runs without atheris: its seeds, and
Hypothesis-made inputs through the same checks, so the harness itself cannot rot."""
import importlib.util
import pathlib

from hypothesis import given, settings, strategies as st, HealthCheck

PATH = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_h2.py"
spec = importlib.util.spec_from_file_location("fuzz_h2", PATH)
fuzz_h2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz_h2)


def test_seeds_pass_the_checks():
    for s in fuzz_h2.seeds():
        fuzz_h2.TestOneInput(s)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 31), st.integers(0, 40),
       st.lists(st.sampled_from(fuzz_h2.DICTIONARY + [b"\0", b"\x04", b"\x01", b"\xff"]) | st.binary(max_size=12),
                max_size=30))
def test_generated_inputs(head, piece, parts):
    fuzz_h2.TestOneInput(bytes([head, piece]) + b"".join(parts))
