"""RunOptions: the run's options as ``vfmig migrate`` takes them and a hosted run receives them."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfmig.core.options import PRECOPY_ACK_GRACE_S, RunOptions
from vfmig.core.phases import PrecopyMode

options = st.builds(
    RunOptions,
    downtime_limit_ms=st.floats(min_value=0.001, max_value=1e6),
    max_precopy_s=st.floats(min_value=0.001, max_value=1e6),
    precopy=st.booleans(),
    allow_no_p2p=st.booleans(),
    compress_level=st.none() | st.integers(min_value=-7, max_value=22),
    step_timeout_s=st.floats(min_value=0.001, max_value=1e6),
    journal_data=st.booleans(),
)


@given(options)
def test_options_cross_the_wire_unchanged(o: RunOptions) -> None:
    assert RunOptions.from_wire(o.to_wire()) == o


@given(st.dictionaries(st.sampled_from([*RunOptions().to_wire(), "new"]), st.from_type(object)))
def test_any_map_gives_options_or_a_value_error(value: dict[str, object]) -> None:
    with contextlib.suppress(ValueError):  # anything else would fail the test
        RunOptions.from_wire(value)


def test_a_peers_map_is_checked_field_by_field() -> None:
    assert RunOptions.from_wire({}) == RunOptions()
    assert (
        RunOptions.from_wire({"new_option": 1, "downtime_limit_ms": 50}).downtime_limit_ms == 50.0
    )
    for bad, message in (
        ({"downtime_limit_ms": 0.0}, "downtime_limit_ms must be a positive number"),
        ({"max_precopy_s": float("inf")}, "max_precopy_s must be a positive number"),
        ({"step_timeout_s": "1"}, "step_timeout_s must be a positive number"),
        ({"precopy": 1}, "precopy must be true or false"),
        ({"compress_level": 23}, "compress_level must be -7..22 or nil"),
        ({"compress_level": True}, "compress_level must be -7..22 or nil"),
    ):
        with pytest.raises(ValueError, match=message):
            RunOptions.from_wire(bad)
    with pytest.raises(ValueError, match="must be a map"):
        RunOptions.from_wire([1])


def test_options_become_the_machines_configuration() -> None:
    config = RunOptions(
        downtime_limit_ms=250.0, max_precopy_s=10.0, precopy=False, step_timeout_s=2.5
    ).machine_config()
    assert config.precopy is PrecopyMode.OFF
    assert config.convergence.downtime_limit_ns == 250_000_000
    assert config.convergence.max_precopy_ns == 10 * 10**9
    assert config.timeouts.precopy_ns == int((10 + PRECOPY_ACK_GRACE_S) * 1e9)
    assert config.step_timeout_ns == 2_500_000_000
    assert RunOptions().machine_config().precopy is PrecopyMode.AUTO
