"""benchmarks/gluon_bwd_check.py's schedule names: each A/B of the Gluon backward (GLUON_NOTES calls
18-48) times the GluonBwdConfig flags its names spell, so a name that parsed to other flags would
time the wrong kernel under the right label."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gluon_bwd_check  # noqa: E402

from fx_flash.codegen import gluon_launch  # noqa: E402


@pytest.mark.parametrize("name, flags", [
    ("rows", ("ROWS_AHEAD", )),
    ("keys+shared", ("KEYS_ON_ROWS", "ROWS_SHARED")),
    ("keys+shared+lpt", ("KEYS_ON_ROWS", "ROWS_SHARED", "LPT")),
    ("rows+msplit", ("ROWS_AHEAD", "SPLIT_M")),
    ("rows+msplit+tmaepi", ("ROWS_AHEAD", "SPLIT_M", "TMA_EPILOGUE")),
    ("rows+msplit+lpt+tmaepi", ("ROWS_AHEAD", "SPLIT_M", "LPT", "TMA_EPILOGUE")),
    ("base", ()),
])
def test_names_spell_flags(name, flags):
    assert gluon_bwd_check._flags(name) == flags


def test_every_flag_is_a_config_field():
    """Every flag a name can spell is one of GluonBwdConfig's schedule flags, which the kernel takes
    as constexprs of the same names."""
    fields = set(gluon_launch.GluonBwdConfig(64, 128, 2).schedule)
    spelled = {flag for flags in gluon_bwd_check.SCHEDULES.values() for flag in flags}
    assert spelled | set(gluon_bwd_check.EXTRAS.values()) <= fields


def test_unknown_names_are_refused():
    with pytest.raises(KeyError):
        gluon_bwd_check._flags("rows+fast")
